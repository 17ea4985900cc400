"""The systemd unit of a controller (`reled-edge@ID.service`), rendered for an install's layout, user and venv.

``firmware_configs/systemd/reled-edge@.service`` is this text for the standard layout (root "/", user ``reled``,
venv ``/opt/reled/.venv``); a test keeps them equal. On the machine's own tree systemd creates the state and log
folders (``StateDirectory=``, ``LogsDirectory=``, with the modes `install` gives them); under another root they are
named as writable paths instead, since systemd only creates folders below /var.
"""

from __future__ import annotations

from pathlib import Path

from edge_runtime.device.layout import Layout

HEADER = """\
# One controller per instance: systemctl enable --now reled-edge@jetson01 (rendered by `reled-edge install`)
# The daemon sends READY=1 once it drives the signal, STATUS= with its mode, model and deploy state, WATCHDOG=1
# from its decision loop (every quarter of WatchdogSec) and STOPPING=1; if the loop stalls for 10 s systemd
# kills and restarts it (the deploy state survives SIGKILL).
"""


def unit_text(layout: Layout, user: str, group: str, venv: Path) -> str:
    """The unit for devices installed in ``layout``, run as ``user``:``group`` from ``venv``."""
    if layout.system:
        writable = ("StateDirectory=reled-edge/%i\nStateDirectoryMode=0700\n"
                    "LogsDirectory=reled-edge\nLogsDirectoryMode=0750\n")
    else:
        writable = f"ReadWritePaths={layout.state_root}/%i {layout.logs}\n"
    return HEADER + f"""\
[Unit]
Description=RELED intersection controller %i
After=network-online.target
Wants=network-online.target

[Service]
Type=notify
NotifyAccess=main
ExecStart={venv}/bin/reled-edge daemon --config {layout.devices}/%i.toml
WatchdogSec=10
Restart=always
RestartSec=2
User={user}
Group={group}
{writable}\
# Decisions must not wait behind the OS: a little priority, and no swapping of the model.
Nice=-5
MemoryMax=200M
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes

[Install]
WantedBy=multi-user.target
"""
