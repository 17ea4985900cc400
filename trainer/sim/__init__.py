"""Everything that speaks TraCI, sumolib or SUMO XML: starting SUMO, reading lanes and lights, metrics.

A hardware-in-the-loop bridge or an expert can use these without an environment; `trainer.env` puts
the PettingZoo API, the safety shield and the rewards on top.
"""
