"""Typed field specs for every message the fleet tools receive from devices (and read back from the broker).

:func:`edge_runtime.protocol.decode_json` bounds a message's size and depth; the specs here bound each
field's type and range, so no report, event or request can reach the deploy judge, the status table or
the chunk server with a shape they do not expect (a 5,000-digit seq, ``{"active": 5}``). A spec returns
the validated value or raises :class:`~edge_runtime.protocol.ProtocolError` naming the field. Objects
keep only the keys they declare: a device may add fields (newer firmware) without being refused, but
nothing undeclared reaches the tools. Plain classes and no dependency: this runs on a Raspberry Pi.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

from edge_runtime.features import MAX_PHASES
from edge_runtime.protocol import CHUNK_LIMIT, DEVICE_ID, MAX_NODES, ProtocolError

COUNTER_MAX = 2**63 - 1  # counters, seqs and versions: what a signed 64-bit field holds
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # terminal control codes (tab and newline allowed)
HEX64 = re.compile(r"^[0-9a-f]{64}$")


class Spec(Protocol):
    def check(self, value: Any, where: str) -> Any: ...


def _kind(value: Any) -> str:
    """The JSON name of a value's type (never the value: it may be huge or hostile)."""
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object", bytes: "bytes", type(None): "null"}.get(type(value), type(value).__name__)


def _fail(where: str, problem: str) -> ProtocolError:
    return ProtocolError(f"{where}: {problem}")


@dataclass(frozen=True)
class Int:
    lo: int = 0
    hi: int = COUNTER_MAX

    def check(self, value: Any, where: str) -> int:
        if type(value) is not int:  # bool is an int subclass: refused
            raise _fail(where, f"expected an integer, got {_kind(value)}")
        if not self.lo <= value <= self.hi:
            raise _fail(where, f"integer outside {self.lo}..{self.hi}")
        return value


@dataclass(frozen=True)
class Float:
    """A finite number (JSON writes 3 for 3.0, so integers are accepted and returned as floats)."""

    lo: float = -math.inf
    hi: float = math.inf

    def check(self, value: Any, where: str) -> float:
        if type(value) not in (int, float):
            raise _fail(where, f"expected a number, got {_kind(value)}")
        try:
            number = float(value)
        except OverflowError:
            raise _fail(where, "number out of range") from None
        if not (math.isfinite(number) and self.lo <= number <= self.hi):
            raise _fail(where, f"number not finite or outside {self.lo:g}..{self.hi:g}")
        return number


@dataclass(frozen=True)
class Bool:
    def check(self, value: Any, where: str) -> bool:
        if type(value) is not bool:
            raise _fail(where, f"expected true or false, got {_kind(value)}")
        return value


@dataclass(frozen=True)
class Str:
    """Bounded text without terminal control codes; ``pattern`` or ``choices`` narrow it further."""

    max_len: int = 256
    pattern: re.Pattern[str] | None = None
    choices: frozenset[str] | None = None

    def check(self, value: Any, where: str) -> str:
        if type(value) is not str:
            raise _fail(where, f"expected a string, got {_kind(value)}")
        if len(value) > self.max_len:
            raise _fail(where, f"string longer than {self.max_len} characters")
        if CONTROL.search(value):
            raise _fail(where, "string with control characters")
        if self.pattern is not None and not self.pattern.match(value):
            raise _fail(where, f"string not of the form {self.pattern.pattern}")
        if self.choices is not None and value not in self.choices:
            raise _fail(where, f"expected one of {sorted(self.choices)}")
        return value


@dataclass(frozen=True)
class Bytes:
    max_len: int

    def check(self, value: Any, where: str) -> bytes:
        if type(value) is not bytes:
            raise _fail(where, f"expected bytes, got {_kind(value)}")
        if len(value) > self.max_len:
            raise _fail(where, f"more than {self.max_len} bytes")
        return value


@dataclass(frozen=True)
class List:
    item: Spec
    max_len: int
    min_len: int = 0

    def check(self, value: Any, where: str) -> list[Any]:
        if type(value) is not list:
            raise _fail(where, f"expected an array, got {_kind(value)}")
        if not self.min_len <= len(value) <= self.max_len:
            raise _fail(where, f"array length outside {self.min_len}..{self.max_len}")
        return [self.item.check(v, f"{where}[{i}]") for i, v in enumerate(value)]


@dataclass(frozen=True)
class Map:
    """An object with free keys (counters by name, say)."""

    key: Str
    value: Spec
    max_len: int = 64

    def check(self, value: Any, where: str) -> dict[str, Any]:
        if type(value) is not dict:
            raise _fail(where, f"expected an object, got {_kind(value)}")
        if len(value) > self.max_len:
            raise _fail(where, f"object with more than {self.max_len} keys")
        return {self.key.check(k, f"{where} key"): self.value.check(v, f"{where}.{k}") for k, v in value.items()}


@dataclass(frozen=True)
class Opt:
    """A field that may be missing or null (validated as None)."""

    spec: Spec

    def check(self, value: Any, where: str) -> Any:
        return None if value is None else self.spec.check(value, where)


@dataclass(frozen=True)
class Obj:
    """An object with declared fields; a missing field is an error unless its spec is :class:`Opt` (then None).
    Undeclared keys are dropped (tolerated, never passed on). Fields present are checked before missing ones
    are named: a wrong type says more about a message than what it lacks."""

    fields: dict[str, Spec] = field(default_factory=dict)

    def check(self, value: Any, where: str) -> dict[str, Any]:
        if type(value) is not dict:
            raise _fail(where, f"expected an object, got {_kind(value)}")
        out = {name: spec.check(value[name], f"{where}.{name}" if where else name)
               for name, spec in self.fields.items() if name in value}
        for name, spec in self.fields.items():
            if name not in out:
                if not isinstance(spec, Opt):
                    raise _fail(f"{where}.{name}" if where else name, "missing")
                out[name] = None
        return out


def validate(document: Any, spec: Spec) -> Any:
    """``document`` checked against ``spec``: the validated copy, or ProtocolError naming the first bad field."""
    return spec.check(document, "")


# -- the messages ----------------------------------------------------------------------------------
COUNTER = Int()
SHA256 = Str(64, HEX64)
DEVICE = Str(64, DEVICE_ID)
NAME = Str(64)  # states, modes, event kinds, precisions
TEXT = Str(4000)  # error and event details
TIME = Float(0.0)
MODEL_REF = Obj({"sha256": SHA256, "policy_version": COUNTER})

REPORTED = Obj({
    "device": DEVICE, "intersection": Str(1024), "state": NAME, "active": Opt(MODEL_REF),
    "previous": List(MODEL_REF, 64), "high_water": COUNTER, "desired_seq": COUNTER, "error": TEXT,
    "error_seq": COUNTER, "mode": NAME, "decisions": Opt(COUNTER), "outbox_rows": Opt(COUNTER), "ts": TIME,
    "job": Opt(Obj({"sha256": SHA256, "policy_version": COUNTER, "seq": COUNTER, "chunks_have": COUNTER,
                    "chunks_total": COUNTER, "probation_decisions": Opt(COUNTER),
                    "probation_needed": Opt(COUNTER)})),
    "decided": Opt(COUNTER), "faults": Opt(Map(NAME, COUNTER)), "newest_issued": Opt(TIME),
    "hil": Opt(Map(NAME, COUNTER)), "outbox_epoch": Opt(COUNTER),
})
STATUS = Obj({"online": Bool(), "device": DEVICE, "pid": Opt(COUNTER), "ts": Opt(TIME)})
EVENT = Obj({"device": DEVICE, "kind": NAME, "detail": TEXT, "state": NAME, "ts": TIME})
ACK = Obj({"epoch": COUNTER, "seq": COUNTER})  # the collector's acknowledgement of a rollout batch
CHUNK_REQUEST = Obj({"sha256": SHA256, "chunks": List(Int(0, 2**31), 1024)})
MANIFEST = Obj({
    "sha256": SHA256, "size": Int(1, 2**40), "chunk_size": Int(1, CHUNK_LIMIT), "chunks": List(SHA256, MAX_NODES),
    "schema_version": Int(0, 2**31), "intersection": Str(1024), "phase_table": List(Str(1024), 64),
    "policy_version": COUNTER, "precision": Str(16), "expires": TIME,
})
COMMAND = Obj({"kind": Str(16, choices=frozenset({"deploy", "rollback"})), "device": DEVICE, "seq": COUNTER,
               "issued": TIME, "manifest": Opt(MANIFEST)})

# hardware-in-the-loop (`reled hil run`): the plant's request to a device, and the device's answer
RUN_ID = Str(64, DEVICE_ID)
PHASE = Int(0, MAX_PHASES - 1)
SHOWN = Obj({"stage": Int(0, 2), "phase": PHASE, "target": PHASE, "since": Float(0.0), "clearing": Bool()})
READING = Float(0.0, 1e6)  # vehicles or seconds at one light: anything larger is not a reading
HIL_OBS = Obj({"run": RUN_ID, "seq": COUNTER, "t": Float(0.0), "until": Float(0.0),
               "per_phase": List(List(READING, 3, min_len=3), MAX_PHASES, min_len=2), "shown": SHOWN})
LINKS = Str(1024, re.compile(r"^[GgyYrsuoO]*$"))  # SUMO's link state characters
HIL_ACT = Obj({"run": RUN_ID, "seq": COUNTER, "t": Float(0.0), "action": PHASE, "source": Int(0, 1),
               "override": Bool(), "resync": Bool(),
               "states": List(Obj({"stage": Int(0, 2), "phase": PHASE, "target": PHASE, "since": Float(0.0),
                                   "links": LINKS}), 64)})
