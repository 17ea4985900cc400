"""TLS end to end: the broker's generated CA, a daemon and the fleet tools connecting over TLS only."""

from __future__ import annotations

import pytest

from edge_runtime.errors import RELEDError
from edge_runtime.fleet.local import free_port, wait_for
from edge_runtime.keys import KeyFolder
from edge_runtime.mqtt import BrokerAddress, Link


def test_daemon_and_status_over_tls(local_fleet, tmp_path):
    fleet = local_fleet
    tls_port = free_port()
    keys = KeyFolder(fleet.keys)
    fleet.write_device("tls0", "X", ["GGrr", "rrGG"], broker={"port": tls_port,
                                                              "ca_file": str(keys.tls_dir / "ca.crt")})
    fleet.init_keys()
    fleet.start_broker(tls_port=tls_port)
    fleet.start_daemon("tls0")
    observer = fleet.observer()  # broker.json names the server listener and the CA: with a TLS port it is TLS too
    assert observer.link.address.port == fleet.server_port and observer.link.address.ca_file
    wait_for(lambda: observer.reported.get("tls0", {}).get("decisions", 0) > 0, 30,
             "the TLS daemon's report", poll=lambda: observer.pump(0.05))
    assert observer.reported["tls0"]["mode"] == "fallback"  # no policy yet: the fixed-time plan
    observer.close()
    status = fleet.edge("status")
    assert status.returncode == 0 and "tls0" in status.stdout, status.stdout + status.stderr
    stranger_ca = KeyFolder(tmp_path / "other").ensure_tls(["127.0.0.1"])
    password = keys.password("reled-server")
    with pytest.raises(RELEDError, match="could not connect"):
        Link(BrokerAddress("127.0.0.1", tls_port, "reled-server", password, str(stranger_ca)), "mitm",
             []).start(timeout=3)
