"""Hardware-in-the-loop runs: SUMO as the street, real controller processes over MQTT (`reled hil run`)."""
