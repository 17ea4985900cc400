"""Site brokers bridged to a central broker: the fleet tools on the central one, the daemons on their sites'.

Real Mosquitto instances on free 127.0.0.1 ports, each in its own folder: a central broker (`broker start`)
and one or two site brokers (`broker start --bridge-to ... --site NAME`); the fixtures in conftest.py stop
them all, with the daemons and the collector, also when a test fails. Each test fails on the bridge setup it
guards against: a topic bridged the wrong way or not at all, retained flags lost on the way, a bridge that
echoes messages back, a clean bridge session (what was queued during an outage is dropped), bridge
credentials that can write what only the server may.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from conftest import FLEET_FAST, FLEET_ROLLOUTS, FleetUnderTest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_runtime.errors import RELEDError
from edge_runtime.fleet.collector import REGISTRATION_TOPIC
from edge_runtime.fleet.local import LocalFleet, free_port, wait_for
from edge_runtime.fleet.server import ServerLink
from edge_runtime.keys import KeyFolder
from edge_runtime.mqtt import BrokerAddress, Link, Message
from edge_runtime.protocol import SERVER_USER, bridge_user, chunk_topic, device_topic, site_topic
from edge_runtime.rollouts import read_rollouts

CITY = {"north": ("dev0", "dev1"), "south": ("dev2", "dev3")}


def words(text: str) -> str:
    """Output with rich's line wrapping undone."""
    return " ".join(text.split())


@pytest.fixture
def city(local_fleet: LocalFleet, fleet_models) -> Callable[..., FleetUnderTest]:
    """``city({"north": ("dev0",), ...}, tls_site="north", dev0={...})``: device files (group `test`, fast
    settings, each device's own overrides), keys, a central broker (with a TLS port when ``tls_site`` bridges over
    TLS), the site brokers bridged to it, and a daemon per device on its site's broker, each waited for until
    the central broker hears it."""

    def start(sites: dict[str, tuple[str, ...]], tls_site: str | None = None,
              **overrides: dict[str, dict]) -> FleetUnderTest:
        tables = fleet_models[1].phase_tables
        lights = sorted(tables)
        for name in sites:
            local_fleet.add_site(name)
        devices = [(device, name) for name, members in sites.items() for device in members]
        for k, (device, name) in enumerate(devices):
            light = lights[k % len(lights)]
            local_fleet.write_device(device, light, tables[light], replay_seed=k, groups=("test",), site=name,
                                     **{**FLEET_FAST, **overrides.get(device, {})})
        local_fleet.init_keys()
        taken = [p for s in local_fleet.sites.values() for p in (s.port, s.server_port)]
        tls_port = free_port(local_fleet.port, local_fleet.server_port, *taken) if tls_site else None
        local_fleet.start_broker(tls_port)
        for name in sites:
            tls = ("--bridge-ca", str(KeyFolder(local_fleet.keys).tls_dir / "ca.crt")) if name == tls_site else ()
            said = words(local_fleet.start_site(name, tls_port if tls else None, *tls))
            assert f"site {name}: bridged to" in said and ("over TLS" in said) == bool(tls), said
        fleet = FleetUnderTest(local_fleet, fleet_models, lights, local_fleet.observer())
        for device, _ in devices:
            local_fleet.start_daemon(device)
        fleet.wait(lambda: all(d in fleet.link.reported for d, _ in devices), 60, "every device reporting centrally")
        return fleet

    return start


@pytest.fixture
def links() -> Iterator[Callable[..., Link]]:
    """``links(address, client_id, subscriptions)``: a started MQTT connection, closed at teardown."""
    started: list[Link] = []

    def connect(address: BrokerAddress, client_id: str, subscriptions: list[str] = ()) -> Link:
        link = Link(address, client_id, list(subscriptions)).start()
        started.append(link)
        return link

    yield connect
    for link in started:
        link.close()


def heard_by(link: Link) -> Callable[[], list[Message]]:
    """What ``link`` received so far (call it to take in more)."""
    heard: list[Message] = []

    def take() -> list[Message]:
        while not link.inbox.empty():
            heard.append(link.inbox.get_nowait())
        return heard

    return take


def test_a_deploy_through_the_central_broker_commits_at_every_site(city):
    fleet = city(CITY, tls_site="north")  # north's bridge over TLS to the central's TLS port, south's plain
    local = fleet.local
    config = (local.sites["north"].folder / "mosquitto.conf").read_text()
    assert "bridge_cafile bridge-ca.crt" in config and "bridge_insecure false" in config
    proc = local.edge("deploy", "--group", "test", "--model", str(fleet.models[1].path), timeout=180)
    assert proc.returncode == 0 and "4/4 committed" in proc.stdout, proc.stdout + proc.stderr
    sha = fleet.models[1].sha256
    devices = [d for members in CITY.values() for d in members]
    fleet.wait(lambda: all(fleet.active_sha(d) == sha for d in devices), 30, "v1 active at both sites")
    status = local.edge("status")  # a fresh connection: what the central broker keeps retained
    out = words(status.stdout)
    assert status.returncode == 0 and out.count("COMMITTED") == 4, status.stdout + status.stderr
    assert all(f"{d} │ yes │ COMMITTED │ v1 {sha[:10]}" in out for d in devices), out
    assert "sites: north bridged, south bridged" in out, out


def test_rollouts_cross_the_bridges_exactly_once(city):
    decisions = 4000
    rollouts = {**FLEET_ROLLOUTS, "runtime": {**FLEET_ROLLOUTS["runtime"], "max_decisions": decisions}}
    fleet = city({"north": ("dev0",), "south": ("dev1",)}, dev0=rollouts, dev1=rollouts)
    out = fleet.local.root / "rollouts"
    collector = fleet.local.edge_background("collect", "--out", str(out), log=fleet.local.root / "collect.log")

    def drained() -> bool:
        return all(fleet.reported(d).get("decisions") == decisions and fleet.reported(d).get("outbox_rows") == 0
                   for d in ("dev0", "dev1"))

    fleet.wait(drained, 120, f"{decisions} decisions per device acknowledged through the bridges")
    collector.send_signal(signal.SIGTERM)
    assert collector.wait(timeout=20) == 0
    summary = words((fleet.local.root / "collect.log").read_text())
    assert f"collected {2 * decisions} rows" in summary, summary  # written: what was recorded, no more
    for device in ("dev0", "dev1"):
        ids = np.sort(read_rollouts(out, device)["decision"])
        assert np.array_equal(ids, np.arange(1, decisions + 1)), (device, len(ids), len(np.unique(ids)))


@pytest.mark.slow
def test_an_outage_loses_no_row_and_a_deploy_issued_during_it_completes(city, links):
    decisions = 6000  # at 150 a second: recording through both outages (about 3,000 in)
    recorder = {**FLEET_ROLLOUTS, "runtime": {"decision_seconds": 1.0, "speed": 150.0, "max_decisions": decisions}}
    fleet = city({"north": ("dev0", "dev1")}, dev0=recorder)  # dev0 records, dev1 takes the deploy
    local = fleet.local
    keys = KeyFolder(local.keys)
    out = local.root / "rollouts"
    collector = local.edge_background("collect", "--out", str(out), log=local.root / "collect.log")
    site = local.observer(site="north")  # the site's own tools listener: what happens there while cut off
    central_state = heard_by(links(BrokerAddress("127.0.0.1", local.server_port, SERVER_USER,
                                                 keys.password(SERVER_USER)), "state-watch", [site_topic("north")]))

    def site_state() -> bytes | None:
        return next((m.payload for m in reversed(central_state())), None)

    def recorded(link: ServerLink = fleet.link) -> int:
        return link.reported.get("dev0", {}).get("decisions", 0)

    fleet.wait(lambda: recorded() >= 1000, 60, "1,000 decisions")
    wait_for(lambda: recorded(site) >= 1000, 30, "the site's own view of dev0", poll=lambda: site.pump(0.05))
    # 1. the central broker crashes: the site queues what its devices publish, they go on recording
    local.kill_broker()
    during = recorded(site) + 750
    wait_for(lambda: recorded(site) >= during, 30, "750 decisions while the central broker is down",
             poll=lambda: site.pump(0.05))
    local.start_broker()
    fleet.wait(lambda: recorded() >= during, 60, "dev0's reports through the bridge again")
    # 2. the site broker crashes; a deploy is issued while its devices are cut off
    local.kill_broker("north")
    assert recorded() < decisions  # dev0 is still recording
    fleet.wait(lambda: site_state() == b"0", 30, "north's bridge will: cut off")
    log = local.root / "deploy.log"
    deploy = local.edge_background("deploy", "--device", "dev1", "--model", str(fleet.models[1].path), "--timeout",
                                   "120", log=log)
    fleet.wait(lambda: fleet.link.desired.get("dev1", {}).get("manifest", {}).get("sha256") == fleet.models[1].sha256,
               60, "the deploy's command on the central broker")
    assert deploy.poll() is None and fleet.reported("dev1").get("state") != "COMMITTED"
    local.start_site("north")  # restarted from its folder: its persistence, the same bridge session
    fleet.wait(lambda: site_state() == b"1", 30, "north bridged again")
    assert deploy.wait(timeout=180) == 0, log.read_text()
    assert "1/1 committed" in words(log.read_text())

    def drained() -> bool:
        return fleet.reported("dev0").get("decisions") == decisions and fleet.reported("dev0").get("outbox_rows") == 0

    fleet.wait(drained, 180, f"{decisions} decisions acknowledged")
    collector.send_signal(signal.SIGTERM)
    assert collector.wait(timeout=20) == 0
    rows = read_rollouts(out, "dev0")
    ids = np.sort(rows["decision"])
    assert np.array_equal(ids, np.arange(1, decisions + 1)), (len(ids), len(np.unique(ids)))
    assert len(np.unique(rows["epoch"])) == 1


def test_bridge_credentials_carry_reports_only_and_nothing_loops(local_fleet, links):
    fleet = local_fleet
    fleet.add_site("north")
    fleet.write_device("dev0", "X", ["GGrr", "rrGG"], site="north")
    fleet.edge("keys", "init", "--keys", str(fleet.keys), "--devices", str(fleet.devices), "--site", "north",
               "--site", "east", check=True)  # east: credentials of a site whose broker does not run
    fleet.start_broker()
    fleet.start_site("north")
    keys = KeyFolder(fleet.keys)

    def address(port: int, user: str) -> BrokerAddress:
        return BrokerAddress("127.0.0.1", port, user, keys.password(user))

    north = fleet.sites["north"]
    central = heard_by(links(address(fleet.server_port, SERVER_USER), "central-watch", ["reled/v1/#"]))
    at_site = heard_by(links(address(north.server_port, SERVER_USER), "site-watch", ["reled/v1/#"]))
    for watcher in (central, at_site):  # subscribed once the bridge's retained state arrives
        wait_for(lambda w=watcher: any(m.topic == site_topic("north") for m in w()), 10, "the retained bridge state")
    # out: a device's report crosses once, and does not come back to the site
    device = links(address(north.port, "dev0"), "dev0")
    device.publish(device_topic("dev0", "reported"), b'{"r": 1}', retain=True).wait_for_publish(5)
    # in: the server's command crosses once, retained, and does not come back to the central broker
    server = links(address(fleet.server_port, SERVER_USER), "server")
    server.publish(device_topic("dev0", "desired"), b"signed", retain=True).wait_for_publish(5)
    # a stolen bridge password writes what devices report, and nothing the server alone may write
    east = links(address(fleet.port, bridge_user("east")), "east")
    forged = [device_topic("dev0", "desired"), device_topic("dev0", "rollouts/ack"), device_topic("dev0", "hil/obs"),
              chunk_topic("0" * 64, 0), REGISTRATION_TOPIC, site_topic("north")]
    for topic in forged:
        east.publish(topic, b"forged", retain=True).wait_for_publish(5)
    east.publish(device_topic("dev1", "events"), b"east's").wait_for_publish(5)
    wait_for(lambda: any(m.payload == b"east's" for m in central()), 10, "the message east may publish")
    wait_for(lambda: any(m.payload == b"signed" for m in at_site()), 10, "the command at the site")
    fleet.observer(site="north").link.publish(device_topic("dev0", "events"), b"last").wait_for_publish(5)
    wait_for(lambda: any(m.payload == b"last" for m in central()), 10, "a later message through the bridge")
    assert sum(m.payload == b'{"r": 1}' for m in central()) == 1
    assert sum(m.payload == b'{"r": 1}' for m in at_site()) == 1
    assert sum(m.payload == b"signed" for m in at_site()) == 1 and sum(m.payload == b"signed" for m in central()) == 1
    assert [m.topic for m in central() if m.payload == b"forged"] == []
    # retained on the far side too, as a fresh connection there finds them
    fresh = heard_by(links(address(north.port, "dev0"), "dev0-again", [device_topic("dev0", "desired")]))
    wait_for(lambda: [(m.payload, m.retain) for m in fresh()] == [(b"signed", True)], 10,
             "the command retained at the site")
    fresh = heard_by(links(address(fleet.server_port, SERVER_USER), "reader", [device_topic("dev0", "reported")]))
    wait_for(lambda: [(m.payload, m.retain) for m in fresh()] == [(b'{"r": 1}', True)], 10,
             "the report retained centrally")
    with pytest.raises(RELEDError, match="could not connect"):  # nor may a bridge use the fleet tools' listener
        Link(address(fleet.server_port, bridge_user("east")), "east-tools", []).start(timeout=3)


@pytest.fixture
def sessions() -> Iterator[Callable[..., list[bytes]]]:
    """``sessions(address, client_id, topic)``: a subscriber whose MQTT session outlives its connection and the
    broker's restart (what arrives while it is away waits for it); returns what it received, as it grows."""
    clients: list[mqtt.Client] = []

    def subscribe(address: BrokerAddress, client_id: str, topic: str) -> list[bytes]:
        received: list[bytes] = []
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        client.username_pw_set(address.username, address.password)
        client.on_message = lambda _c, _u, message: received.append(message.payload)
        subscribed = threading.Event()
        client.on_subscribe = lambda *_: subscribed.set()
        client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        client.reconnect_delay_set(0.2, 1)
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 3600
        client.connect(address.host, address.port, clean_start=False, properties=properties)
        client.loop_start()
        clients.append(client)
        assert subscribed.wait(10), f"{client_id} not subscribed"
        return received

    yield subscribe
    for client in clients:
        client.disconnect()
        client.loop_stop()


def test_what_is_queued_during_an_outage_crosses_once_it_ends(local_fleet, links, sessions):
    fleet = local_fleet
    fleet.add_site("north")
    for device in ("dev0", "dev1"):
        fleet.write_device(device, "X", ["GGrr", "rrGG"], site="north")
    fleet.init_keys()
    fleet.start_broker()
    fleet.start_site("north")
    keys = KeyFolder(fleet.keys)
    north = fleet.sites["north"]

    def address(port: int, user: str) -> BrokerAddress:
        return BrokerAddress("127.0.0.1", port, user, keys.password(user))

    events = sessions(address(fleet.server_port, SERVER_USER), "events", device_topic("+", "events"))
    acks = sessions(address(north.port, "dev0"), "dev0", device_topic("dev0", "rollouts/ack"))
    sent = [b"%d" % i for i in range(50)]
    # the central broker is away: the site broker keeps what its devices publish in the bridge's session
    fleet.stop_broker()
    device = links(address(north.port, "dev1"), "dev1")
    for payload in sent:
        device.publish(device_topic("dev1", "events"), payload).wait_for_publish(5)
    fleet.start_broker()
    wait_for(lambda: set(events) == set(sent), 30, "the events published while the central broker was away")
    # the site broker is away: the central broker keeps what the server sends in the bridge's session there
    fleet.stop_broker("north")
    server = links(address(fleet.server_port, SERVER_USER), "server")
    for payload in sent:
        server.publish(device_topic("dev0", "rollouts/ack"), payload).wait_for_publish(5)
    fleet.start_site("north")
    wait_for(lambda: set(acks) == set(sent), 30, "the acks sent while the site broker was away")


def test_bridge_options_are_checked(local_fleet, assert_one_line_error):
    fleet = local_fleet
    fleet.init_keys()

    def start(*args: str):
        return fleet.edge("broker", "start", "--keys", str(fleet.keys), "--dir", str(fleet.root / "site"), *args)

    assert_one_line_error(start("--bridge-to", "central.example"), "HOST:PORT")
    assert_one_line_error(start("--bridge-to", "127.0.0.1:1883"), "--bridge-to needs --site")
    assert_one_line_error(start("--site", "north"), "give --bridge-to")
    assert_one_line_error(start("--bridge-to", "127.0.0.1:1883", "--site", "north"),
                          "no bridge credentials for site north", "keys init")
    assert_one_line_error(start("--bridge-to", "127.0.0.1:1883", "--site", "north", "--bridge-ca",
                                str(fleet.root / "none.crt")), "--bridge-ca", "does not exist")
    keys = ["keys", "init", "--keys", str(fleet.keys)]
    assert_one_line_error(fleet.edge(*keys, "--site", "no such"), "site name 'no such'")
    assert_one_line_error(fleet.edge(*keys, "--device", "reled-bridge-x"), "site brokers' bridge users")
