"""Write firmware_configs/systemd/reled-edge@.service from the template `reled-edge install` renders, for the
standard layout: root /, user and group reled, venv /opt/reled/.venv.

Run after changing edge_runtime/device/unit.py or layout.py; tests/test_edge_install.py fails while it is stale.
"""

from __future__ import annotations

from pathlib import Path

from edge_runtime.device.layout import SERVICE_USER, UNIT_NAME, Layout
from edge_runtime.device.unit import unit_text

UNIT_FILE = Path(__file__).resolve().parents[1] / "firmware_configs" / "systemd" / UNIT_NAME


def standard_unit() -> str:
    layout = Layout()
    return unit_text(layout, SERVICE_USER, SERVICE_USER, layout.venv)


if __name__ == "__main__":
    UNIT_FILE.write_text(standard_unit())
    print(f"wrote {UNIT_FILE}")
