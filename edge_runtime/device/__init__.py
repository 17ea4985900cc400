"""What runs on the intersection controller: the daemon, its deployments, device files, outbox and adapters.

Kept apart from the fleet side (:mod:`edge_runtime.fleet`) so a controller's code is one folder; both build
on the dependency-light core at the package's top level (protocol, keys, policy, shield, features, ...).
"""
