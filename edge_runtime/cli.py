"""`reled-edge`: the fleet side (keys, broker, deploy, status, rollback, collect, a local fleet) and the controller
daemon."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from edge_runtime import __version__
from edge_runtime.console import console, err_console, user_errors
from edge_runtime.errors import RELEDError
from edge_runtime.features import MAX_PHASES, SCHEMA_VERSION, feature_names
from edge_runtime.logs import setup_logging
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
BRIDGE_WAIT = 5.0  # s `broker start --bridge-to` waits for the bridge before it says it is not connected yet


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    setup_logging(verbose)


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
    site: Annotated[list[str] | None, typer.Option(help="A site broker to create bridge credentials for "
                                                        "(reled-bridge-SITE; repeatable): start the central broker "
                                                        "from this folder afterwards, so it accepts the site.")]
    = None,
) -> None:
    """Create the Ed25519 signing key pair and per-device MQTT passwords. Safe to run again: existing keys are
    kept, only new devices get credentials. Copy signing.pub and credentials/<id>.secret to each device."""
    from edge_runtime.device.device_config import device_files
    from edge_runtime.keys import KeyFolder

    ids = list(device or [])
    if devices is not None:
        ids += [d for d in device_files(devices) if d not in ids]
    folder = KeyFolder(keys)
    created, users = folder.init(ids, list(site or []))
    console.print(f"signing key: {'created' if created else 'kept'} ({folder.public_key_path})")
    console.print(f"new MQTT credentials: {', '.join(users) if users else 'none'}; all users: "
                  f"{', '.join(folder.users())}")


@broker_app.command("start")
@user_errors
def broker_start(
    keys: KeysOption = DEFAULT_KEYS,
    dir: Annotated[Path, typer.Option("--dir", help="Where the config, password files, ACLs, persistence and "
                                                    "log go (owned by the mosquitto user when started as root).")]
    = DEFAULT_BROKER_DIR,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Plain MQTT port for devices.")] = 1883,
    tls_port: Annotated[int | None, typer.Option(help="TLS port for devices (a CA and server certificate are "
                                                      "generated into KEYS/tls); the server port uses TLS too.")]
    = None,
    tls_only: Annotated[bool, typer.Option("--tls-only", help="No plain MQTT port: devices connect over TLS only "
                                                              "(the production setting).")] = False,
    tls_name: Annotated[list[str] | None, typer.Option(help="A DNS name or IP address devices reach the broker by, "
                                                            "added to the server certificate (repeatable).")] = None,
    server_port: Annotated[int | None, typer.Option(help="Port of the fleet tools' listener (reled-server only) "
                                                         "\\[default: the TLS port + 1 with --tls-port, else "
                                                         "--port + 1]")] = None,
    device_host: Annotated[list[str] | None, typer.Option(help="Another address the device listeners (not the fleet "
                                                               "tools') listen on (repeatable; `fleet up --netem` "
                                                               "gives each namespace's link).")] = None,
    bridge_to: Annotated[str | None, typer.Option(help="Start a SITE broker, bridged to the central broker at "
                                                       "HOST:PORT (its device port; its TLS port with --bridge-ca): "
                                                       "devices connect here, the fleet tools to the central "
                                                       "broker \\[default: none: a central or single broker]")]
    = None,
    site: Annotated[str | None, typer.Option(help="With --bridge-to: this site's name; the bridge logs in to the "
                                                  "central broker as reled-bridge-SITE (`keys init --site SITE`) "
                                                  "\\[default: none]")] = None,
    bridge_ca: Annotated[Path | None, typer.Option(help="With --bridge-to: the central broker's CA (its "
                                                        "KEYS/tls/ca.crt); the bridge then uses TLS and checks that "
                                                        "the central's certificate names HOST \\[default: none: "
                                                        "plain MQTT]")] = None,
) -> None:
    """Start Mosquitto: no anonymous access, one user per device, each device limited to its own topics and
    its user name as client id; the fleet tools connect to a listener of their own. With --bridge-to, a site
    broker that forwards its devices' topics to and from the central broker."""
    from edge_runtime.fleet import bridge, broker
    from edge_runtime.keys import KeyFolder

    if bridge_to is None and (site is not None or bridge_ca is not None):
        raise RELEDError("--site and --bridge-ca describe a site broker's bridge: give --bridge-to HOST:PORT too")
    link = bridge.Bridge.parse(bridge_to, site, bridge_ca) if bridge_to is not None else None
    folder = KeyFolder(keys)
    info = broker.start(dir, folder, host, port, tls_port, server_port, tls_only, list(tls_name or []),
                        device_hosts=list(device_host or []), bridge=link)
    plain = f"devices on {info.port}, " if info.port is not None else ""
    tls = f"devices over TLS on {info.tls_port} (CA {info.ca_file}), " if info.tls_port is not None else ""
    console.print(f"mosquitto running on {info.host}: {plain}{tls}fleet tools on {info.server_port}; pid {info.pid}, "
                  f"log {dir.resolve() / 'mosquitto.log'}", highlight=False, soft_wrap=True)
    if link is None:
        if sites := folder.sites():
            console.print(f"accepting the bridges of sites {', '.join(sites)}", highlight=False)
        return
    over = "TLS" if link.ca_file is not None else "plain MQTT"
    if bridge.wait_connected(folder, dir, link.site, BRIDGE_WAIT):
        console.print(f"site {link.site}: bridged to {link.address} over {over}", highlight=False)
    else:  # the site serves its devices all the same; Mosquitto keeps trying
        console.print(f"[yellow]site {escape(link.site)}: the bridge to {link.address} ({over}) is not connected "
                      f"after {BRIDGE_WAIT:g} s[/]: {escape(broker.last_log_line(dir))} (it keeps retrying)",
                      highlight=False, soft_wrap=True)


@broker_app.command("stop")
@user_errors
def broker_stop(dir: Annotated[Path, typer.Option("--dir", help="The folder given to `broker start`.")]
                = DEFAULT_BROKER_DIR) -> None:
    """Stop the broker started from --dir (its retained messages are saved); a recorded pid that is no longer
    that broker is left alone."""
    from edge_runtime.fleet import broker

    console.print(broker.stop(dir))


# -- fleet ----------------------------------------------------------------------------------------
def _server(keys: Path, broker_dir: Path, host: str | None, port: int | None, name: str,
            extra: list[str] | None = None, will: tuple[str, bytes] | None = None) -> Any:
    from edge_runtime.fleet.server import ServerLink, server_address
    from edge_runtime.keys import KeyFolder

    folder = KeyFolder(keys)
    return ServerLink(folder, server_address(folder, broker_dir, host, port), name, extra or [], will).start()


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
    timeout: Annotated[float, typer.Option(help="Give a device up after this many seconds without progress (a "
                                                "chunk, a state, a probation decision); run the same deploy again "
                                                "later and the download resumes.")] = 600.0,
    until: Annotated[str, typer.Option(help="committed, or staged: done once verified and staged (hardware-in-the-"
                                            "loop devices commit during the next `reled hil run`).")] = "committed",
    devices: DevicesOption = DEFAULT_DEVICES,
    keys: KeysOption = DEFAULT_KEYS,
    broker_dir: BrokerDirOption = DEFAULT_BROKER_DIR,
    host: HostOption = None,
    port: PortOption = None,
) -> None:
    """Sign a manifest per device, publish it as the retained desired state, serve the chunks the devices ask
    for, and wait until each reports COMMITTED (or print why it did not). Exit code 1 if any failed."""
    from edge_runtime.device.device_config import device_files
    from edge_runtime.fleet.deploy import DONE, STAGED_DONE, select_devices
    from edge_runtime.fleet.deploy import deploy as run_deploy
    from edge_runtime.fleet.server import Model

    if until not in (DONE, STAGED_DONE):
        raise RELEDError(f"--until {until!r}: choose committed or staged")
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
            t.add_row(Text(target.device), Text(target.intersection), Text(target.progress),  # device text: no markup
                      f"[{colour}]{target.outcome}[/]", Text(target.detail))
        return t

    try:
        with Live(console=console, refresh_per_second=4, transient=not console.is_terminal) as live:
            results = run_deploy(server, policy, targets_cfg, canary, chunk_size, expires_hours * 3600, timeout,
                                 on_progress=lambda ts: live.update(table(ts)), until_staged=until == STAGED_DONE)
    finally:
        server.close()
    console.print(table(results))
    done = sum(r.outcome == until for r in results)
    refused = f", {server.chunks.refused} chunk requests refused" if server.chunks.refused else ""
    console.print(f"{done}/{len(results)} {until} in {time.monotonic() - start:.1f} s, "
                  f"{server.chunks.served} chunks served{refused}")
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
    """Every device's reported state, model, mode and drift from its desired state; a device whose messages break
    the protocol's schema is listed as invalid, with the reason. Against a central broker, also whether each site
    broker's bridge is connected (its devices' rows are their last reports while it is not)."""
    from edge_runtime.fleet.deploy import fleet_snapshot
    from edge_runtime.protocol import site_topic

    server = _server(keys, broker_dir, host, port, "status", [site_topic("+")])
    sites: dict[str, bool] = {}  # site broker -> its bridge connected (the state it keeps retained here)

    def on_message(message: Any) -> None:
        parts = message.topic.split("/")
        if len(parts) == 5 and message.topic == site_topic(parts[3]) and message.payload in (b"0", b"1"):
            sites[parts[3]] = message.payload == b"1"

    try:
        fleet_snapshot(server, settle, on_message)
    finally:
        server.close()
    table = Table(title="fleet")
    for column in ("device", "online", "state", "active", "desired", "drift", "mode", "decisions", "outbox",
                   "last error"):
        table.add_column(column)
    invalid = server.invalid
    for dev in sorted(set(server.reported) | set(server.status) | set(server.desired) | set(invalid)):
        rep = server.reported.get(dev, {})  # validated documents only (edge_runtime.schema)
        active = rep.get("active") or {}
        desired = server.desired.get(dev, {})
        wanted = (desired.get("manifest") or {}).get("sha256") if desired.get("kind") == "deploy" else None
        drift = "-" if wanted is None else ("no" if wanted == active.get("sha256") else "[red]yes[/]")
        want_text = f"v{desired['manifest']['policy_version']}" if wanted else desired.get("kind", "-")
        online = server.status.get(dev, {}).get("online")
        state = Text("invalid", style="bold red") if dev in invalid else Text(rep.get("state", "?"))
        model = f"v{active['policy_version']} {active['sha256'][:10]}" if active else ("fixed-time" if rep else "?")
        # text from devices goes in as Text, never as markup
        table.add_row(Text(dev), {True: "[green]yes[/]", False: "[red]no[/]"}.get(online, "?"), state, model,
                      want_text, drift, Text(rep.get("mode", "?")), str(rep.get("decisions", "?")),
                      str(rep.get("outbox_rows", "?")), Text(invalid.get(dev) or rep.get("error") or ""))
    console.print(table)
    if sites:
        console.print("sites: " + ", ".join(f"{escape(name)} {'[green]bridged[/]' if up else '[red]cut off[/]'}"
                                            for name, up in sorted(sites.items())), highlight=False, soft_wrap=True)


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
    """Receive the controllers' rollouts, write every batch exactly once and acknowledge it. One collector per
    fleet: refused while another one runs (any folder, any machine)."""
    from edge_runtime.fleet.collector import CLAIM_TOPICS, REGISTRATION_TOPIC, Collector, lock_folder

    lock = lock_folder(out)
    server = _server(keys, broker_dir, host, port, "collect", [CLAIM_TOPICS], will=(REGISTRATION_TOPIC, b""))
    collector = Collector(server, out)
    stopping: list[bool] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    end = time.monotonic() + seconds if seconds > 0 else float("inf")
    last_log = time.monotonic()
    try:
        collector.register()
        while not stopping and time.monotonic() < end:
            collector.pump(0.1)
            if time.monotonic() - last_log > 5:
                last_log = time.monotonic()
                logging.getLogger("reled.collect").info("%s", collector.stats)
    except KeyboardInterrupt:
        pass
    finally:
        collector.release()
        server.close()
        lock.close()
    s = collector.stats
    console.print(f"collected {s.rows} rows in {s.batches} batches into {out} "
                  f"({s.duplicates} duplicate batches dropped, {s.refused} refused)")


@app.command()
@user_errors
def daemon(
    config: Annotated[Path, typer.Option(help="The device file (firmware_configs/devices/ID.toml).")],
    check: Annotated[bool, typer.Option("--check", help="Validate the configuration and every file it names, and "
                                                        "exit (code 2, each problem on a line, if any).")] = False,
) -> None:
    """Run the intersection controller: policy decisions through the safety shield, signed deployments,
    rollout streaming. SIGTERM/SIGINT stop it cleanly; every deploy step survives SIGKILL."""
    from edge_runtime.device.device_config import file_problems, load_device_config

    cfg = load_device_config(config)
    if check:
        problems = file_problems(cfg)
        for problem in problems:
            err_console.print(f"{escape(str(config))}: {escape(problem)}", highlight=False, soft_wrap=True)
        if problems:
            raise RELEDError(f"{config}: {len(problems)} of the files it names would stop the daemon (listed above)")
        console.print(f"{config}: device {cfg.id}, intersection {cfg.device.intersection}, "
                      f"{len(cfg.signal.green_phases)} phases, broker {cfg.broker.host}:{cfg.broker.port}: ok")
        return
    # become the lean runner (same pid, for systemd): months of running without typer, rich and pydantic
    verbose = ["--verbose"] if logging.getLogger().level == logging.DEBUG else []
    os.execv(sys.executable, [sys.executable, "-m", "edge_runtime.device", "--config", str(config), *verbose])


@app.command()
@user_errors
def install(
    config: Annotated[Path, typer.Option(help="The device file to install (firmware_configs/devices/ID.toml, or one "
                                              "`fleet up` wrote).")],
    keys: Annotated[Path | None, typer.Option(help="A copy of the server's key folder: signing.pub, "
                                                   "credentials/ID.secret and tls/ca.crt come from there \\[default: "
                                                   "the files the device file names]")] = None,
    recording: Annotated[Path | None, typer.Option(help="The replay sensor's recording (`reled record`) \\[default: "
                                                        "the device file's \\[sensor] file]")] = None,
    root: Annotated[Path, typer.Option(help="Install below this folder instead of / (tests, images): the device "
                                            "file and unit name the paths below it.")] = Path("/"),
    user: Annotated[str, typer.Option(help="The system user the daemon runs as.")] = "reled",
    create_user: Annotated[bool, typer.Option("--create-user/--no-user", help="Create the user if it is missing "
                                                                              "(--no-user: it must exist).")]
    = True,
    venv: Annotated[Path | None, typer.Option(help="The virtualenv the unit runs reled-edge from: an existing one is "
                                                   "checked (and upgraded with --package), a missing one created "
                                                   "\\[default: ROOT/opt/reled/.venv]")] = None,
    package: Annotated[str | None, typer.Option(help="What pip installs into the venv, with its \\[edge] extra: a "
                                                     "reled wheel or source folder, or a requirement \\[default: "
                                                     "none: the venv must exist]")] = None,
    python: Annotated[Path, typer.Option(help="The interpreter a missing venv is created with (the service user "
                                              "must be able to run it).")] = Path(sys.executable),
    find_links: Annotated[Path | None, typer.Option(help="Install offline from this folder of wheels "
                                                         "\\[default: none: the package index]")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and exit.")] = False,
    check: Annotated[bool, typer.Option("--check", help="Only check the installed controller, as the service user: "
                                                        "one line per problem, exit code 2 if any.")] = False,
) -> None:
    """Install one controller on this machine (as root): the service user, the venv, the state and log folders,
    the public key, password, CA and recording with their modes, the device file with the installed paths, and
    the systemd unit. Safe to run again: only what is missing or wrong changes. Ends with the --check."""
    from edge_runtime.device.install import InstallRequest, apply, plan
    from edge_runtime.device.install import check as check_install

    request = InstallRequest(config, keys, recording, root, user, create_user, venv, package, python, find_links)
    if not check:
        planned = plan(request)
        console.print(f"{'plan' if dry_run else 'installing'} controller {escape(planned.device)} "
                      f"(user {escape(user)}, root {escape(str(request.layout.root))})", highlight=False)
        if dry_run:
            for step in planned.steps:
                console.print(f"  {escape(step.describe())}", highlight=False, soft_wrap=True)
            return
        apply(planned.steps, lambda what, outcome: console.print(f"  {escape(what)}: [bold]{escape(outcome)}[/]",
                                                              highlight=False, soft_wrap=True))
    device, problems = check_install(request)
    for problem in problems:
        err_console.print(escape(problem), highlight=False, soft_wrap=True)
    if problems:
        raise RELEDError(f"{len(problems)} problem(s) keep the controller from running as {user} (listed above)")
    console.print(f"checked as {escape(user)}: the daemon can read and write everything it needs; start it with "
                  f"`systemctl enable --now reled-edge@{escape(device)}`",
                  highlight=False, soft_wrap=True)


@fleet_app.command("up")
@user_errors
def fleet_up(
    dir: Annotated[Path, typer.Option("--dir", help="The fleet's folder: keys, broker, device files and state, "
                                                    "rollouts, logs and fleet.json.")],
    model: Annotated[Path | None, typer.Option(help="An ONNX policy from `reled export` (required).",
                                               show_default=False)] = None,
    policy: Annotated[Path | None, typer.Option(hidden=True, help="Old name of --model.")] = None,
    scenario: Annotated[str | None, typer.Option(help="Refuse a model exported for another scenario.")] = None,
    devices: Annotated[int | None, typer.Option(min=1, help="Controllers to start, one per light of the model, in "
                                                            "its order \\[default: every light]")] = None,
    hil: Annotated[bool, typer.Option("--hil/--replay", help="--hil: the controllers' detectors, heads and clock are "
                                                             "a simulation's (`reled hil run --fleet DIR`); --replay: "
                                                             "synthetic detector data, 10x faster than real time.")]
    = True,
    collect: Annotated[bool, typer.Option("--collect/--no-collect", help="Run `reled-edge collect --out "
                                                                         "DIR/rollouts` with the fleet.")] = True,
    netns: Annotated[bool, typer.Option("--netns", help="Put every controller in a network namespace of its own, "
                                                        "reaching the broker over a veth pair (needs root).")]
    = False,
    netem: Annotated[str | None, typer.Option(help="Impair each of those links with this netem spec, applied both "
                                                   "ways, e.g. 'delay 20ms loss 1%' (implies --netns; needs the "
                                                   "kernel's netem).")] = None,
    deploy: Annotated[bool, typer.Option("--deploy/--no-deploy", help="Deploy the model to every controller and "
                                                                      "wait for it (--replay: COMMITTED; --hil: "
                                                                      "staged until the simulation decides).")]
    = True,
    foreground: Annotated[bool, typer.Option("--foreground", help="Stay until Ctrl-C or SIGTERM, then stop the "
                                                                  "fleet (default: return, leaving it running).")]
    = False,
    latency_budget_ms: Annotated[float, typer.Option(min=0.1, help="A decision slower than this counts as a policy "
                                                                   "failure (the fixed-time plan runs): a street "
                                                                   "controller's budget; daemons sharing this "
                                                                   "machine's cores with SUMO may need more.")]
    = 5.0,
    recordings: Annotated[Path | None, typer.Option(help="With --replay: each controller replays its light's "
                                                         "recording from this folder (`reled record --out DIR`) "
                                                         "\\[default: synthetic detector data]")] = None,
) -> None:
    """Start a fleet on this machine and return, leaving it running: keys, Mosquitto, one controller daemon per
    light of the model (devices dev0, dev1, ... in group `local`, timed as the model was trained), the rollout
    collector, and the model deployed. `reled-edge fleet down --dir DIR` stops it."""
    from edge_runtime.fleet.local import UpRequest, down, interrupt_on_sigterm, up, wait_for_stop

    model = model or policy
    if model is None:
        raise RELEDError("give the policy to run: --model policy.onnx (from `reled export`)")
    if foreground:
        interrupt_on_sigterm()  # from here on SIGTERM stops the fleet, as Ctrl-C does
    record, states = up(UpRequest(model, dir, scenario, devices, hil, collect, netns, netem, deploy,
                                  latency_budget_ms, recordings.resolve() if recordings else None),
                        progress=lambda line: console.print(escape(line), highlight=False, soft_wrap=True))
    try:
        spaces = netns or netem is not None
        mode = "hil" if record["hil"] else "replay"
        table = Table(title=f"{Path(record['model']).name} ({record['scenario']}, {mode})")
        for column in ("device", "light", "pid", "state", *(["netns"] if spaces else [])):
            table.add_column(column)
        for device, entry in record["devices"].items():
            table.add_row(device, Text(entry["intersection"]), str(entry["pid"]), Text(states.get(device, "?")),
                          *([entry["netns"]] if spaces else []))
        console.print(table)
        if not foreground:
            console.print(f"running detached; stop it with `reled-edge fleet down --dir {escape(str(dir))}`",
                          highlight=False, soft_wrap=True)
            return
        console.print("running in the foreground: Ctrl-C or SIGTERM stops the fleet")
        wait_for_stop()
    finally:
        if foreground:
            console.print(escape(down(dir)), highlight=False, soft_wrap=True)


@fleet_app.command("down")
@user_errors
def fleet_down(dir: Annotated[Path, typer.Option("--dir", help="The folder given to `fleet up`.")]) -> None:
    """Stop the fleet started from --dir: daemons (SIGTERM, SIGKILL after 20 s), collector, broker, network
    namespaces. Only processes whose command line still names this fleet are signalled; safe to run again."""
    from edge_runtime.fleet.local import down

    console.print(escape(down(dir)), highlight=False, soft_wrap=True)
