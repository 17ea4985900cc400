"""Site brokers: one Mosquitto per district, bridged to the central broker by Mosquitto's own bridge.

Devices connect to their site broker exactly as to a single broker (their own credentials, ACL and client
ids). The site broker forwards their topics to the central broker under the same names, so `deploy`,
`status`, `rollback` and `collect` work unchanged against the central broker:

- out (device → server): ``FROM_DEVICE`` of every device (reports, status, events, chunk requests, rollouts,
  HIL answers);
- in (server → device): ``TO_DEVICE`` of every device (signed commands, rollout acks, HIL requests) and
  the model chunks.

Every topic travels one way only, and ``try_private`` makes the central broker treat the connection as a
bridge (no echo to the sender, retained flags kept), so nothing loops and retained messages stay retained
on both sides. The bridge logs in as ``reled-bridge-<site>`` with a session of its own on the central
broker (``cleansession false``, a fixed client id): QoS 1 messages for the site wait there while the site
is away, and the site broker queues what its devices publish while the central one is away; both brokers
persist their queues. Whatever a broker loses anyway (a SIGKILL before its autosave, a queue past its
limits) the protocol recovers: devices resend unacknowledged rollouts and report again, the central broker
keeps the commands retained and sends them again at every (re)connection of the bridge.
"""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edge_runtime.errors import RELEDError
from edge_runtime.protocol import FROM_DEVICE, QOS, ROOT, TO_DEVICE, bridge_user, device_topic, site_topic

if TYPE_CHECKING:
    from edge_runtime.keys import KeyFolder

CA_FILE = "bridge-ca.crt"  # the central broker's CA, copied into the site broker's folder for its user
RESTART_TIMEOUT = (1, 10)  # s: reconnect after 1 s, backing off (with jitter) to at most 10 s
KEEPALIVE = 10  # s: a dead central broker is noticed within 15 s (Mosquitto's default, 60, takes 90)
MODELS = f"{ROOT}/models/#"


@dataclass(frozen=True)
class Bridge:
    """A site broker's connection to the central broker; ``ca_file`` set: TLS, verified against that CA."""

    site: str
    host: str
    port: int
    ca_file: Path | None = None

    @classmethod
    def parse(cls, address: str, site: str | None, ca_file: Path | None) -> Bridge:
        """From `broker start --bridge-to HOST:PORT --site NAME [--bridge-ca FILE]`."""
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise RELEDError(f"--bridge-to {address!r}: give the central broker as HOST:PORT")
        if site is None:
            raise RELEDError("--bridge-to needs --site NAME: the bridge logs in to the central broker as "
                             "reled-bridge-NAME (`reled-edge keys init --site NAME` creates it)")
        try:
            bridge_user(site)
        except ValueError as exc:
            raise RELEDError(f"--site: {exc}") from None
        if ca_file is not None and not ca_file.is_file():
            raise RELEDError(f"--bridge-ca {ca_file} does not exist: copy the central broker's KEYS/tls/ca.crt")
        return cls(site, host, int(port), ca_file.resolve() if ca_file is not None else None)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def config_lines(bridge: Bridge, password: str) -> list[str]:
    """The site broker's ``connection`` section (after its listeners in mosquitto.conf, which is 0600: it holds
    the bridge's password, as Mosquitto needs it in plain)."""
    user = bridge_user(bridge.site)
    tls = [f"bridge_cafile {CA_FILE}", "bridge_insecure false", "bridge_tls_version tlsv1.2"] \
        if bridge.ca_file is not None else []
    return [
        "", f"# the bridge to the central broker: site {bridge.site} (docs/edge.md, 'Site brokers')",
        f"connection {user}",
        f"address {bridge.address}",
        f"remote_clientid {user}",  # the central broker makes it the user name anyway (use_username_as_clientid)
        f"local_clientid {user}:local",  # ':' is in no device id, so no device can take this session over
        f"remote_username {user}",
        f"remote_password {password}",
        "cleansession false",  # a session on the central broker: what is queued for the site waits there
        "local_cleansession false",  # and one here: what the devices publish waits while the central is away
        "bridge_protocol_version mqttv311",
        "try_private true",  # marks us as a bridge: no echo back, retained flags kept (loop prevention)
        "bridge_attempt_unsubscribe true",  # a session kept across restarts drops subscriptions no longer listed
        "start_type automatic",
        f"restart_timeout {RESTART_TIMEOUT[0]} {RESTART_TIMEOUT[1]}",
        f"keepalive_interval {KEEPALIVE}",
        "notifications true",  # retained "1"/"0" on both brokers; the central's is the bridge's will
        f"notification_topic {site_topic(bridge.site)}",
        *tls,
        *(f"topic {device_topic('+', leaf)} out {QOS}" for leaf in FROM_DEVICE),
        *(f"topic {device_topic('+', leaf)} in {QOS}" for leaf in TO_DEVICE),
        f"topic {MODELS} in {QOS}",
    ]


def central_acl(sites: list[str]) -> str:
    """What each site's bridge may do on the central broker's device listeners: publish what devices report,
    read what the server sends them and the model chunks, and keep its own state. It cannot write a command,
    an ack, a HIL request, a chunk or the collector's registration."""
    return "".join(
        f"\n# site {site}'s bridge\nuser {bridge_user(site)}\n"
        + "".join(f"topic write {device_topic('+', leaf)}\n" for leaf in FROM_DEVICE)
        + "".join(f"topic read {device_topic('+', leaf)}\n" for leaf in TO_DEVICE)
        + f"topic read {MODELS}\ntopic write {site_topic(site)}\n"
        for site in sites)


def wait_connected(keys: KeyFolder, folder: Path, site: str, timeout: float) -> bool:
    """Whether the site broker started from ``folder`` says its bridge is connected within ``timeout`` s."""
    from edge_runtime.fleet.server import server_address  # the tools' connection to the site broker
    from edge_runtime.mqtt import Link

    link = Link(server_address(keys, folder, None, None), f"reled-server-bridge-{time.time_ns() % 10**9}",
                [site_topic(site)]).start()
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if link.inbox.get(timeout=0.1).payload == b"1":  # a retained "0" from before is superseded
                    return True
            except queue.Empty:
                pass
        return False
    finally:
        link.close()
