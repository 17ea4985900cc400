"""Write firmware_configs/mosquitto/{mosquitto.conf,acl,acl-server}.example from the templates `reled-edge broker start`
uses, for the production setting: `--host 0.0.0.0 --tls-port 8883 --tls-only` (fleet tools on 8884, TLS).

Run after changing edge_runtime/fleet/broker.py; tests/test_edge_units.py fails while the examples are stale.
"""

from __future__ import annotations

from pathlib import Path

from edge_runtime.fleet.broker import BrokerInfo, acl_text, config_text, server_acl_text

EXAMPLE_DIR = Path(__file__).resolve().parents[1] / "firmware_configs" / "mosquitto"


def example_config() -> str:
    return config_text(BrokerInfo(host="0.0.0.0", port=None, server_port=8884, tls_port=8883))


if __name__ == "__main__":
    (EXAMPLE_DIR / "mosquitto.conf.example").write_text(example_config())
    (EXAMPLE_DIR / "acl.example").write_text(acl_text())
    (EXAMPLE_DIR / "acl-server.example").write_text(server_acl_text())
    print(f"wrote {EXAMPLE_DIR}/mosquitto.conf.example, acl.example and acl-server.example")
