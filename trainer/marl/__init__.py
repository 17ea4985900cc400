"""Multi-agent PPO (IPPO and MAPPO) over the traffic-signal environment, with parallel SUMO workers."""
