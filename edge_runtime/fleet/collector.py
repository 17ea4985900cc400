"""`reled-edge collect`: receive rollout batches, write each exactly once, acknowledge it.

A batch is written (temp file, then rename) before it is acknowledged, and a batch whose file already
exists is acknowledged again without being written, so a device that resends after a lost ack or a
restart never produces a duplicate. Files land as ``DIR/<device>/<epoch>/<seq>.npz`` for the trainer
(:func:`edge_runtime.rollouts.read_rollouts`).

One fleet, one place: two collectors would split the batches between their folders, each acknowledging
what it wrote. So a collector claims the fleet before it subscribes to rollouts: an flock on
``DIR/.collect.lock`` (same folder, same machine) and a retained registration on
:data:`REGISTRATION_TOPIC` (any folder, any machine), which it clears on a clean exit. Its MQTT will
clears it when the process dies (at once: the kernel closes the connection; within 1.5× the 10 s
keepalive when the machine or the network dies), and the registration expires by itself
:data:`CLAIM_EXPIRY` s after its last refresh in case neither happened (the broker was down at exit). A
registration from this machine whose process is gone is taken over at once; any other is refused with
a one-line error that says so.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from edge_runtime.errors import RELEDError
from edge_runtime.fileio import atomic_path
from edge_runtime.fleet.server import ServerLink
from edge_runtime.mqtt import Message
from edge_runtime.protocol import ROOT, ProtocolError, decode_json, device_of, device_topic, encode
from edge_runtime.rollouts import batch_path, unpack
from edge_runtime.schema import COUNTER, TIME, Obj, Str, validate

log = logging.getLogger(__name__)

ROLLOUT_TOPIC = f"{ROOT}/dev/+/rollouts"
REGISTRATION_TOPIC = f"{ROOT}/server/collector"
PROBE_TOPIC = f"{REGISTRATION_TOPIC}/probe"  # a round trip: retained messages arrive before it
CLAIM_TOPICS = f"{REGISTRATION_TOPIC}/#"  # the registration and the probe
LOCK_FILE = ".collect.lock"
CLAIM_REFRESH = 10.0  # seconds between re-publications of the registration
CLAIM_EXPIRY = 30  # seconds a registration outlives its last refresh
REGISTRATION = Obj({"id": Str(64), "out": Str(4096), "host": Str(255), "pid": COUNTER, "started": TIME})


def lock_folder(out: Path) -> IO[str]:
    """Hold ``out``'s collector lock until the returned file is closed (or the process dies)."""
    out.mkdir(parents=True, exist_ok=True)
    handle = (out / LOCK_FILE).open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip()[:100]
        handle.close()
        raise RELEDError(f"another `reled-edge collect` ({holder or 'unknown pid'}) is writing to {out}: "
                         "one collector per fleet") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle


def process_gone(pid: int) -> bool:
    """Whether no process ``pid`` exists on this machine (one we may not signal does exist)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        pass
    return False


@dataclass
class CollectorStats:
    batches: int = 0
    rows: int = 0
    duplicates: int = 0
    refused: int = 0


class Collector:
    """Writes the batches ``server`` receives into ``out``, once :meth:`register` has claimed the fleet."""

    def __init__(self, server: ServerLink, out: Path):
        self.server = server
        self.out = out
        self.stats = CollectorStats()
        self.per_device: dict[str, int] = {}
        self.refusing: set[str] = set()  # topics whose last batch was refused (logged once, then counted)
        self.me = {"id": secrets.token_hex(8), "out": str(out.resolve()), "host": socket.gethostname(),
                   "pid": os.getpid(), "started": time.time()}
        self.holder: dict[str, Any] | None = None  # the registration on the broker as last seen (None: none)
        self.registered = False  # ours was published and came back
        self.last_refresh = 0.0
        self.was_connected = True
        self.probe = secrets.token_hex(8).encode()
        self.probe_back = False

    # -- the claim -------------------------------------------------------------------------------
    def register(self, timeout: float = 10.0) -> None:
        """Claim the fleet's rollouts, or RELEDError naming the live collector that has them."""
        self.server.link.publish(PROBE_TOPIC, self.probe)
        self._pump_until(lambda: self.probe_back, timeout, "a probe message")
        other = self.holder
        if other is not None and not (other["host"] == self.me["host"] and process_gone(other["pid"])):
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(other["started"]))
            raise RELEDError(f"collector pid {other['pid']} on {other['host']} has been collecting this fleet's "
                             f"rollouts into {other['out']} since {started}: one collector per fleet, stop it first "
                             f"(one that was killed loses its claim within {CLAIM_EXPIRY} s)")
        self._refresh()
        self._pump_until(lambda: self.registered, timeout, "the registration")
        self.server.link.subscribe(ROLLOUT_TOPIC)

    def release(self) -> None:
        """Clear our registration (a clean exit; a crash leaves that to the will and the expiry)."""
        if self.registered:
            with contextlib.suppress(RuntimeError, ValueError):  # not connected: the expiry clears it
                self.server.link.publish(REGISTRATION_TOPIC, b"", retain=True).wait_for_publish(5)

    def _refresh(self) -> None:
        self.last_refresh = time.monotonic()
        self.server.link.publish(REGISTRATION_TOPIC, encode(self.me), retain=True, expiry=CLAIM_EXPIRY)

    def _pump_until(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise RELEDError(f"the broker did not return {what} within {timeout:g} s")
            self.server.pump(0.05, on_message=self.handle)

    def _on_registration(self, payload: bytes) -> None:
        if not payload:  # cleared: by a collector that died after we took over, or by a stray will
            self.holder = None
            if self.registered:
                self._refresh()
            return
        try:
            holder = validate(decode_json(payload), REGISTRATION)
        except ProtocolError as exc:
            log.warning("ignored an unreadable collector registration: %s", exc)
            return
        self.holder = holder
        if holder["id"] == self.me["id"]:
            self.registered = True
        elif self.registered:  # registered after us: two collectors started together, the later one wins
            self.registered = False
            raise RELEDError(f"collector pid {holder['pid']} on {holder['host']} took over this fleet's rollouts "
                             f"(into {holder['out']}): stopping")

    # -- batches ---------------------------------------------------------------------------------
    def handle(self, message: Message) -> None:
        if message.topic == REGISTRATION_TOPIC:
            self._on_registration(message.payload)
        elif message.topic == PROBE_TOPIC:
            self.probe_back = self.probe_back or message.payload == self.probe
        elif message.topic.endswith("/rollouts") and self.registered:
            self._on_batch(message)

    def _on_batch(self, message: Message) -> None:
        try:
            device = device_of(message.topic)
            batch = unpack(message.payload)
            if batch.device != device:
                raise ProtocolError(f"the batch claims device {batch.device}")
        except ProtocolError as exc:
            self.stats.refused += 1
            level = logging.DEBUG if message.topic in self.refusing else logging.WARNING
            self.refusing.add(message.topic)
            log.log(level, "refused a rollout batch on %s: %s", message.topic, exc)
            return
        self.refusing.discard(message.topic)
        path = batch_path(self.out, device, batch.epoch, batch.seq)
        if path.exists():
            self.stats.duplicates += 1
        else:
            with atomic_path(path) as tmp, tmp.open("wb") as fh:
                np.savez(fh, **batch.columns)
            self.stats.batches += 1
            self.stats.rows += batch.rows
            self.per_device[device] = self.per_device.get(device, 0) + batch.rows
        self.server.link.publish(device_topic(device, "rollouts/ack"), encode({"epoch": batch.epoch,
                                                                                "seq": batch.seq}))

    def pump(self, wait: float = 0.1) -> None:
        """Handle what arrived; keep the registration fresh, and renew it at once after a reconnect (a restarted
        broker may have lost it)."""
        connected = self.server.link.connected.is_set()
        if self.registered and connected and (not self.was_connected
                                              or time.monotonic() - self.last_refresh >= CLAIM_REFRESH):
            self._refresh()
        self.was_connected = connected
        self.server.pump(wait, on_message=self.handle)
