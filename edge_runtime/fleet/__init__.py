"""What the server side runs: the Mosquitto broker, signed deploys, fleet status, the rollout collector, and a
local fleet of real daemons for tests, benchmarks and trying deployments without hardware.
"""
