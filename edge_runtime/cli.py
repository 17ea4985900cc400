"""`reled-edge`: the fleet side (keys, broker, deploy, status, rollback, collect, a local fleet) and the controller
daemon."""

from __future__ import annotations

import logging
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from edge_runtime import __version__
from edge_runtime.console import console, user_errors
from edge_runtime.features import MAX_PHASES, SCHEMA_VERSION, feature_names
from edge_runtime.shield import SignalTiming

app = typer.Typer(help="RELED edge runtime: the intersection controller daemon and the fleet tools that deploy "
                       "policies to it over MQTT.", no_args_is_help=True, pretty_exceptions_enable=False)
keys_app = typer.Typer(help="Signing key and MQTT credentials.", no_args_is_help=True)
broker_app = typer.Typer(help="Run the fleet's Mosquitto broker.", no_args_is_help=True)
fleet_app = typer.Typer(help="A fleet of real controllers on this machine (no hardware needed).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(broker_app, name="broker")
app.add_typer(fleet_app, name="fleet")
KeysOption = Annotated[Path, typer.Option(help="The server's key folder (signing key, MQTT credentials, TLS).")]
BrokerDirOption = Annotated[Path, typer.Option(help="Folder of the broker started by `reled-edge broker start` "
                                                    "(its address is read from there).")]
HostOption = Annotated[str | None, typer.Option(help="Broker host \\[default: the one in --broker-dir]")]
PortOption = Annotated[int | None, typer.Option(help="Broker port \\[default: the one in --broker-dir]")]
DevicesOption = Annotated[Path, typer.Option(help="Folder of device files: the fleet (ids, intersections, "
                                                  "groups).")]
DEFAULT_KEYS = Path("keys")
DEFAULT_BROKER_DIR = Path(".reled/broker")
DEFAULT_DEVICES = Path("firmware_configs/devices")


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("edge_runtime.mqtt").setLevel(logging.WARNING if not verbose else logging.DEBUG)


@app.command()
def version() -> None:
    """Print the runtime and observation-schema versions."""
    console.print(f"reled-edge {__version__}, observation schema v{SCHEMA_VERSION}")


@app.command()
def features(max_phases: Annotated[int, typer.Option(help="Padded phase count.")] = MAX_PHASES) -> None:
    """The observation vector a controller must build from its detectors, entry by entry."""
    table = Table(title=f"observation schema v{SCHEMA_VERSION}")
    table.add_column("index", justify="right")
    table.add_column("feature")
    for i, name in enumerate(feature_names(max_phases)):
        table.add_row(str(i), name)
    console.print(table)
    t = SignalTiming()
    console.print(f"shield defaults: yellow {t.yellow:g} s, all-red {t.all_red:g} s, "
                  f"green {t.min_green:g}..{t.max_green:g} s")


# -- keys and broker ------------------------------------------------------------------------------
@keys_app.command("init")
@user_errors
def keys_init(
    keys: KeysOption = DEFAULT_KEYS,
    device: Annotated[list[str] | None, typer.Option(help="A device to create MQTT credentials for "
                                                          "(repeatable).")] = None,
    devices: Annotated[Path | None, typer.Option(help="Also every device file in this folder.")] = None,
) -> None:
    """Create the Ed25519 signing key pair and per-device MQTT passwords. Safe to run again: existing keys are
    kept, only new devices get credentials. Copy signing.pub and credentials/<id>.secret to each device."""
    from edge_runtime.device.device_config import device_files
    from edge_runtime.keys import KeyFolder

    ids = list(device or [])
    if devices is not None:
        ids += [d for d in device_files(devices) if d not in ids]
    folder = KeyFolder(keys)
    created, users = folder.init(ids)
    console.print(f"signing key: {'created' if created else 'kept'} ({folder.public_key_path})")
    console.print(f"new MQTT credentials: {', '.join(users) if users else 'none'}; all users: "
                  f"{', '.join(folder.users())}")


@broker_app.command("start")
@user_errors
def broker_start(
    keys: KeysOption = DEFAULT_KEYS,
    dir: Annotated[Path, typer.Option("--dir", help="Where the config, password file, ACL, persistence and "
                                                    "log go.")] = DEFAULT_BROKER_DIR,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Plain MQTT port.")] = 1883,
    tls_port: Annotated[int | None, typer.Option(help="Also listen with TLS here (a CA and server certificate "
                                                      "are generated into KEYS/tls).")] = None,
) -> None:
    """Start Mosquitto: no anonymous access, one user per device, each device limited to its own topics."""
    from edge_runtime.fleet import broker
    from edge_runtime.keys import KeyFolder

    info = broker.start(dir, KeyFolder(keys), host, port, tls_port)
    tls = f", TLS on {info.tls_port} (CA {info.ca_file})" if info.tls_port else ""
    console.print(f"mosquitto running on {info.host}:{info.port}{tls}, pid {info.pid}; log {dir / 'mosquitto.log'}")


@broker_app.command("stop")
@user_errors
def broker_stop(dir: Annotated[Path, typer.Option("--dir", help="The folder given to `broker start`.")]
                = DEFAULT_BROKER_DIR) -> None:
    """Stop the broker started from --dir (its retained messages are saved)."""
    from edge_runtime.fleet import broker

    pid = broker.stop(dir)
    console.print(f"stopped mosquitto (pid {pid})" if pid else "no broker was running")


# -- fleet ----------------------------------------------------------------------------------------
def _server(keys: Path, broker_dir: Path, host: str | None, port: int | None, name: str,
            extra: list[str] | None = None) -> Any:
    from edge_runtime.fleet.server import ServerLink, server_address
    from edge_runtime.keys import KeyFolder

    folder = KeyFolder(keys)
    return ServerLink(folder, server_address(folder, broker_dir, host, port), name, extra or []).start()


@app.command()
@user_errors
def deploy(
    model: Annotated[Path, typer.Option(help="The ONNX policy from `reled export`.")],
    device: Annotated[list[str] | None, typer.Option(help="Target device id (repeatable).")] = None,
    group: Annotated[str | None, typer.Option(help="Every device whose file lists this group.")] = None,
    canary: Annotated[int, typer.Option(min=0, help="Deploy to the first N targets, and to the rest only once "
                                                    "they all committed.")] = 0,
    chunk_size: Annotated[int, typer.Option(help="Bytes per chunk message (1024..65536).")] = 65536,
    expires_hours: Annotated[float, typer.Option(help="Devices refuse the manifest after this long.")] = 24.0,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for every device to commit.")] = 600.0,
    devices: DevicesOption = DEFAULT_DEVICES,
    keys: KeysOption = DEFAULT_KEYS,
    broker_dir: BrokerDirOption = DEFAULT_BROKER_DIR,
    host: HostOption = None,
    port: PortOption = None,
) -> None:
    """Sign a manifest per device, publish it as the retained desired state, serve the chunks the devices ask
    for, and wait until each reports COMMITTED (or print why it did not). Exit code 1 if any failed."""
    from edge_runtime.device.device_config import device_files
    from edge_runtime.fleet.deploy import DONE, select_devices
    from edge_runtime.fleet.deploy import deploy as run_deploy
    from edge_runtime.fleet.server import Model

    targets_cfg = select_devices(device_files(devices), list(device or []), group)
    policy = Model.load(model)
    server = _server(keys, broker_dir, host, port, "deploy")
    start = time.monotonic()

    def table(targets: list[Any]) -> Table:
        t = Table(title=f"deploy {model.name} · policy v{policy.policy_version} · {policy.sha256[:12]}")
        for column in ("device", "intersection", "state", "outcome", "detail"):
            t.add_column(column)
        for target in targets:
            colour = {"committed": "green", "failed": "red"}.get(target.outcome, "yellow")
            t.add_row(target.device, target.intersection, target.progress, f"[{colour}]{target.outcome}[/]",
                      escape(target.detail))
        return t

    try:
        with Live(console=console, refresh_per_second=4, transient=not console.is_terminal) as live:
            results = run_deploy(server, policy, targets_cfg, canary, chunk_size, expires_hours * 3600, timeout,
                                 on_progress=lambda ts: live.update(table(ts)))
    finally:
        server.close()
    console.print(table(results))
    done = sum(r.outcome == DONE for r in results)
    console.print(f"{done}/{len(results)} committed in {time.monotonic() - start:.1f} s, "
                  f"{server.chunks_served} chunks served")
    if done < len(results):
        raise typer.Exit(1)


@app.command()
@user_errors
def status(
    keys: KeysOption = DEFAULT_KEYS,
    broker_dir: BrokerDirOption = DEFAULT_BROKER_DIR,
    host: HostOption = None,
    port: PortOption = None,
    settle: Annotated[float, typer.Option(help="Seconds to gather the retained reports.")] = 1.0,
) -> None:
    """Every device's reported state, model, mode and drift from its desired state."""
    from edge_runtime.fleet.deploy import fleet_snapshot

    server = _server(keys, broker_dir, host, port, "status")
    try:
        fleet_snapshot(server, settle)
    finally:
        server.close()
    table = Table(title="fleet")
    for column in ("device", "online", "state", "active", "desired", "drift", "mode", "decisions", "outbox",
                   "last error"):
        table.add_column(column)
    for dev in sorted(set(server.reported) | set(server.status) | set(server.desired)):
        rep = server.reported.get(dev, {})
        active = rep.get("active") or {}
        desired = server.desired.get(dev, {})
        wanted = (desired.get("manifest") or {}).get("sha256") if desired.get("kind") == "deploy" else None
        drift = "-" if wanted is None else ("no" if wanted == active.get("sha256") else "[red]yes[/]")
        want_text = f"v{desired['manifest']['policy_version']}" if wanted else desired.get("kind", "-")
        online = server.status.get(dev, {}).get("online")
        table.add_row(dev, {True: "[green]yes[/]", False: "[red]no[/]"}.get(online, "?"), rep.get("state", "?"),
                      f"v{active['policy_version']} {active['sha256'][:10]}" if active else "fixed-time",
                      want_text, drift, rep.get("mode", "?"), str(rep.get("decisions", "?")),
                      str(rep.get("outbox_rows", "?")), escape(rep.get("error", "") or ""))
    console.print(table)


@app.command("rollback")
@user_errors
def rollback_command(
    device: Annotated[str, typer.Option(help="The device to roll back.")],
    timeout: Annotated[float, typer.Option(help="Seconds to wait for its confirmation.")] = 60.0,
    keys: KeysOption = DEFAULT_KEYS,
    broker_dir: BrokerDirOption = DEFAULT_BROKER_DIR,
    host: HostOption = None,
    port: PortOption = None,
) -> None:
    """Send a signed rollback: the device returns to its previous model (fixed-time if it has none)."""
    from edge_runtime.fleet.deploy import rollback

    server = _server(keys, broker_dir, host, port, "rollback")
    try:
        reported = rollback(server, device, timeout)
    finally:
        server.close()
    active = reported.get("active")
    console.print(f"{device} rolled back; now running "
                  f"{'policy v' + str(active['policy_version']) if active else 'the fixed-time plan'}")


@app.command()
@user_errors
def collect(
    out: Annotated[Path, typer.Option(help="Where batches are written: OUT/<device>/<epoch>/<seq>.npz.")],
    seconds: Annotated[float, typer.Option(help="Stop after this long (0: until Ctrl-C or SIGTERM).")] = 0.0,
    keys: KeysOption = DEFAULT_KEYS,
    broker_dir: BrokerDirOption = DEFAULT_BROKER_DIR,
    host: HostOption = None,
    port: PortOption = None,
) -> None:
    """Receive the controllers' rollouts, write every batch exactly once and acknowledge it."""
    from edge_runtime.fleet.collector import ROLLOUT_TOPIC, Collector

    server = _server(keys, broker_dir, host, port, "collect", [ROLLOUT_TOPIC])
    collector = Collector(server, out)
    stopping: list[bool] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    end = time.monotonic() + seconds if seconds > 0 else float("inf")
    last_log = time.monotonic()
    try:
        while not stopping and time.monotonic() < end:
            collector.pump(0.1)
            if time.monotonic() - last_log > 5:
                last_log = time.monotonic()
                logging.getLogger("reled.collect").info("%s", collector.stats)
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    s = collector.stats
    console.print(f"collected {s.rows} rows in {s.batches} batches into {out} "
                  f"({s.duplicates} duplicate batches dropped, {s.refused} refused)")


@app.command()
@user_errors
def daemon(
    config: Annotated[Path, typer.Option(help="The device file (firmware_configs/devices/ID.toml).")],
    check: Annotated[bool, typer.Option("--check", help="Validate the configuration and exit.")] = False,
) -> None:
    """Run the intersection controller: policy decisions through the safety shield, signed deployments,
    rollout streaming. SIGTERM/SIGINT stop it cleanly; every deploy step survives SIGKILL."""
    from edge_runtime.device.daemon import DeviceDaemon
    from edge_runtime.device.device_config import load_device_config

    cfg = load_device_config(config)
    if check:
        console.print(f"{config}: device {cfg.id}, intersection {cfg.device.intersection}, "
                      f"{len(cfg.signal.green_phases)} phases, broker {cfg.broker.host}:{cfg.broker.port}: ok")
        return
    controller = DeviceDaemon(cfg)
    signal.signal(signal.SIGTERM, lambda *_: controller.stop())
    signal.signal(signal.SIGINT, lambda *_: controller.stop())
    controller.run()


@fleet_app.command("up")
@user_errors
def fleet_up(
    policy: Annotated[Path, typer.Option(help="An ONNX policy from `reled export`.")],
    dir: Annotated[Path, typer.Option("--dir", help="Where keys, broker and device state go.")],
    devices: Annotated[int, typer.Option(help="Controllers to start (one per light of the policy).")] = 3,
    deploy: Annotated[bool, typer.Option("--deploy", help="Deploy --policy to every controller, print the fleet's "
                                                          "status and stop (instead of waiting).")] = False,
) -> None:
    """Start Mosquitto and one controller daemon per light of the policy, replaying synthetic detector data 10x
    faster than real time, and leave them running until Ctrl-C (devices dev0, dev1, ... in group `local`; try
    `reled-edge deploy --keys DIR/keys --broker-dir DIR/broker --devices DIR/devices --group local`)."""
    from edge_runtime.fleet.local import up

    code = up(policy, devices, dir, deploy)
    if code:
        raise typer.Exit(code)
