"""Write firmware_configs/mosquitto/{mosquitto.conf,acl}.example from the template `reled-edge broker start` uses.

Run after changing edge_runtime/fleet/broker.py; tests/test_edge_units.py fails while the examples are stale.
"""

from __future__ import annotations

from pathlib import Path

from edge_runtime.fleet.broker import acl_text, config_text

EXAMPLE_DIR = Path(__file__).resolve().parents[1] / "firmware_configs" / "mosquitto"
BROKER_DIR = Path("/var/lib/reled-broker")


def example_config() -> str:
    return config_text(BROKER_DIR, "0.0.0.0", 1883, 8883, Path("/etc/reled-broker/tls"), user="mosquitto")


if __name__ == "__main__":
    (EXAMPLE_DIR / "mosquitto.conf.example").write_text(example_config())
    (EXAMPLE_DIR / "acl.example").write_text(acl_text())
    print(f"wrote {EXAMPLE_DIR}/mosquitto.conf.example and acl.example")
