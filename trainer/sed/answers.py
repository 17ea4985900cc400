"""The JSON a model must answer with: a GBNF grammar for llama.cpp, a JSON schema for other servers,
and the parser that checks an answer against the same rules.

Both formats are generated from the subset's valid phases and the timing bounds, so a
grammar-constrained answer is a valid plan or phase by construction; the parser still checks
every answer, because an HTTP server may ignore the grammar.

step answer:  [2,0]          (one phase per light, in label order: fewest tokens, it is generated
                              at every decision)
plan answer:  {"I1":{"order":[0,2,1],"green":[20,15,30],"offset":10},"I2":{...}}
strategy answer: {"I1":{"tool":"webster","cycle":90,"favour":1},"I2":{"tool":"max-pressure"},
                  "I3":{"tool":"actuated","min_green":10,"max_green":40,"favour":-1}}
                 (a classical tool per light with its parameters; favour -1 favours no phase)
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from typing import Any

from edge_runtime.shield import SignalTiming

MAX_PERMUTED_PHASES = 4  # up to 4 phases every order is allowed (24); above, rotations of the program order
MAX_OFFSET_S = 299
MODES = ("plan", "step", "strategy")
# The tools a strategy answer can name; trainer.sed.tools runs them.
TOOLS = ("max-pressure", "greedy", "program", "webster", "actuated")
TOOL_PARAMETERS = {"max-pressure": (), "greedy": (), "program": (), "webster": ("cycle", "favour"),
                   "actuated": ("min_green", "max_green", "favour")}
MIN_CYCLE_S = 30
MAX_CYCLE_S = 150  # Webster's formula explodes as demand nears capacity; practice caps the cycle


def cycle_bounds(n_phases: int, timing: SignalTiming) -> tuple[int, int]:
    """Shortest and longest cycle the shield allows for n phases, within practice's 30..150 s."""
    change = timing.yellow + timing.all_red
    shortest = math.ceil(max(MIN_CYCLE_S, n_phases * (timing.min_green + change)))
    longest = math.floor(min(MAX_CYCLE_S, n_phases * (timing.max_green + change)))
    return shortest, max(shortest, longest)


@dataclass(frozen=True)
class StrategyChoice:
    """What a strategy answer asks of one light: a tool and its parameters (0 / -1 where unused)."""

    tool: str
    cycle: int = 0
    min_green: int = 0
    max_green: int = 0
    favour: int = -1

    def as_dict(self) -> dict[str, Any]:
        return {"tool": self.tool, **{name: getattr(self, name) for name in TOOL_PARAMETERS[self.tool]}}


class AnswerError(ValueError):
    """The model's answer is not valid JSON of the expected shape (counted, never fatal)."""


@dataclass(frozen=True)
class TimingPlan:
    """One light's plan: phases in ``order``, each green for ``green`` seconds, shifted by ``offset``."""

    order: tuple[int, ...]
    green: tuple[int, ...]
    offset: int

    def cycle(self, timing: SignalTiming) -> float:
        """Cycle length: the greens plus one change (yellow + all-red) before each of them."""
        return float(sum(self.green)) + len(self.order) * (timing.yellow + timing.all_red)

    def phase_at(self, seconds_since_start: float, timing: SignalTiming) -> int:
        """The phase the plan wants at a time: green_0, change, green_1, change, ... from the offset on;
        during a change the plan already asks for the next phase."""
        change = timing.yellow + timing.all_red
        position = (seconds_since_start - self.offset) % self.cycle(timing)
        end = 0.0
        for k, green in enumerate(self.green):
            end += green
            if position < end:
                return self.order[k]
            end += change
            if position < end:
                return self.order[(k + 1) % len(self.order)]
        return self.order[0]

    def as_dict(self) -> dict[str, Any]:
        return {"order": list(self.order), "green": list(self.green), "offset": self.offset}


@dataclass(frozen=True)
class AnswerFormat:
    """Answer rules for one subset: per light label, its number of phases."""

    mode: str  # "step" | "plan" | "strategy"
    labels: tuple[str, ...]
    n_phases: tuple[int, ...]
    timing: SignalTiming

    # -- generation ---------------------------------------------------------------------------
    def gbnf(self) -> str:
        """A GBNF grammar without free whitespace: compact answers, fewest tokens."""
        rules = []
        parts = []
        lo, hi = int(self.timing.min_green), int(self.timing.max_green)
        for k, (label, n) in enumerate(zip(self.labels, self.n_phases, strict=True)):
            if self.mode == "strategy":
                parts.append(f'"\\"{label}\\":" v{k}')
                rules += self._strategy_rules(k, n)
            elif self.mode == "step":
                parts.append(f"v{k}")
                rules.append(f"v{k} ::= " + " | ".join(f'"{p}"' for p in range(n)))
            else:
                parts.append(f'"\\"{label}\\":" v{k}')
                orders = " | ".join('"[' + ",".join(map(str, o)) + ']"' for o in self.orders(n))
                greens = '"," '.join(["g"] * n)
                rules.append(f'v{k} ::= "{{\\"order\\":" o{k} ",\\"green\\":[" {greens} "],\\"offset\\":" off "}}"')
                rules.append(f"o{k} ::= {orders}")
        brackets = ('"["', '"]"') if self.mode == "step" else ('"{"', '"}"')
        root = f"root ::= {brackets[0]} " + ' "," '.join(parts) + f" {brackets[1]}"
        if self.mode != "step":
            rules.append("g ::= " + " | ".join(f'"{s}"' for s in range(lo, hi + 1)))
        if self.mode == "plan":
            rules.append('off ::= [0-9] | [1-9] [0-9] | [1-2] [0-9] [0-9]')
        return "\n".join([root, *rules]) + "\n"

    def _strategy_rules(self, k: int, n: int) -> list[str]:
        """One light's strategy: a fixed-parameter tool, Webster with a cycle, or actuated with greens."""
        def q(text: str) -> str:
            return '"' + text.replace('"', '\\"') + '"'
        simple = [q('{"tool":"' + tool + '"}') for tool, names in TOOL_PARAMETERS.items() if not names]
        webster = q('{"tool":"webster","cycle":') + f" c{k} " + q(',"favour":') + f" f{k} " + q("}")
        actuated = (q('{"tool":"actuated","min_green":') + " g " + q(',"max_green":') + " g "
                    + q(',"favour":') + f" f{k} " + q("}"))
        shortest, longest = cycle_bounds(n, self.timing)
        return [f"v{k} ::= " + " | ".join([*simple, webster, actuated]),
                f"c{k} ::= " + " | ".join(f'"{c}"' for c in range(shortest, longest + 1)),
                f"f{k} ::= " + " | ".join(f'"{p}"' for p in range(-1, n))]

    def json_schema(self) -> dict[str, Any]:
        """The same rules as a JSON schema (vLLM's guided decoding; orders are checked by the parser)."""
        if self.mode == "step":
            items = [{"type": "integer", "enum": list(range(n))} for n in self.n_phases]
            return {"type": "array", "prefixItems": items, "items": False, "minItems": len(items)}
        props: dict[str, Any] = {}
        for label, n in zip(self.labels, self.n_phases, strict=True):
            if self.mode == "strategy":
                shortest, longest = cycle_bounds(n, self.timing)
                green = {"type": "integer", "minimum": int(self.timing.min_green),
                         "maximum": int(self.timing.max_green)}
                params = {"cycle": {"type": "integer", "minimum": shortest, "maximum": longest},
                          "min_green": green, "max_green": green,
                          "favour": {"type": "integer", "minimum": -1, "maximum": n - 1}}
                props[label] = {"anyOf": [
                    {"type": "object", "additionalProperties": False, "required": ["tool", *names],
                     "properties": {"tool": {"const": tool}, **{p: params[p] for p in names}}}
                    for tool, names in TOOL_PARAMETERS.items()]}
                continue
            props[label] = {
                "type": "object", "additionalProperties": False, "required": ["order", "green", "offset"],
                "properties": {
                    "order": {"type": "array", "minItems": n, "maxItems": n,
                              "items": {"type": "integer", "enum": list(range(n))}},
                    "green": {"type": "array", "minItems": n, "maxItems": n,
                              "items": {"type": "integer", "minimum": int(self.timing.min_green),
                                        "maximum": int(self.timing.max_green)}},
                    "offset": {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET_S}}}
        return {"type": "object", "additionalProperties": False, "required": list(self.labels), "properties": props}

    @staticmethod
    def orders(n: int) -> list[tuple[int, ...]]:
        """Phase orders the grammar allows: every permutation for few phases, else the rotations."""
        if n <= MAX_PERMUTED_PHASES:
            return [(0, *rest) for rest in itertools.permutations(range(1, n))] + [
                o for o in itertools.permutations(range(n)) if o[0] != 0]
        return [tuple((start + k) % n for k in range(n)) for start in range(n)]

    def example(self) -> str:
        """The answer's shape, shown in the prompt. Placeholders, not numbers: a small model copies
        whatever numbers it is shown."""
        if self.mode == "step":
            return "[" + ",".join(f"<phase of {label}>" for label in self.labels) + "]"
        if self.mode == "strategy":
            return "{" + ",".join(f'"{label}":{{"tool":"<tool>",<its parameters>}}' for label in self.labels) + "}"
        body = ",".join(f'"{label}":{{"order":[<each phase once>],"green":[<seconds for each phase in that '
                        f'order>],"offset":<seconds>}}' for label in self.labels)
        return "{" + body + "}"

    # -- parsing ------------------------------------------------------------------------------
    def parse(self, text: str) -> dict[str, Any]:
        """Label -> phase (step) or TimingPlan (plan); AnswerError says what was wrong."""
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, TypeError) as exc:
            raise AnswerError(f"not JSON: {exc}") from None
        if self.mode == "step":
            if not isinstance(data, list) or len(data) != len(self.labels):
                raise AnswerError(f"expected a list of {len(self.labels)} phases, for {', '.join(self.labels)}")
            data = dict(zip(self.labels, data, strict=True))
        elif not isinstance(data, dict) or set(data) != set(self.labels):  # plan and strategy
            raise AnswerError(f"expected an object with keys {list(self.labels)}")
        return {label: self._parse_one(label, n, data[label])
                for label, n in zip(self.labels, self.n_phases, strict=True)}

    def _parse_one(self, label: str, n: int, value: Any) -> int | TimingPlan | StrategyChoice:
        if self.mode == "step":
            if not _is_int(value) or not 0 <= value < n:
                raise AnswerError(f"{label}: phase must be an integer in 0..{n - 1}, got {value!r}")
            return int(value)
        if self.mode == "strategy":
            return self._parse_strategy(label, n, value)
        if not isinstance(value, dict) or set(value) != {"order", "green", "offset"}:
            raise AnswerError(f"{label}: a plan needs exactly order, green and offset")
        order, green, offset = value["order"], value["green"], value["offset"]
        if not isinstance(order, list) or sorted(order) != list(range(n)) or not all(map(_is_int, order)):
            raise AnswerError(f"{label}: order must list each phase 0..{n - 1} once, got {order!r}")
        lo, hi = self.timing.min_green, self.timing.max_green
        if (not isinstance(green, list) or len(green) != n
                or not all(_is_int(g) and lo <= g <= hi for g in green)):
            raise AnswerError(f"{label}: green must be {n} whole seconds in {lo:g}..{hi:g}, got {green!r}")
        if not _is_int(offset) or not 0 <= offset <= MAX_OFFSET_S:
            raise AnswerError(f"{label}: offset must be whole seconds in 0..{MAX_OFFSET_S}, got {offset!r}")
        return TimingPlan(tuple(order), tuple(green), int(offset))


    def _parse_strategy(self, label: str, n: int, value: Any) -> StrategyChoice:
        """A tool the pool knows, with exactly its parameters, each possible for this light."""
        tool = value.get("tool") if isinstance(value, dict) else None
        if tool not in TOOL_PARAMETERS:
            raise AnswerError(f"{label}: unknown tool {tool!r}: choose one of {', '.join(TOOLS)}")
        names = TOOL_PARAMETERS[tool]
        if set(value) != {"tool", *names}:
            raise AnswerError(f"{label}: {tool} takes exactly {', '.join(names) or 'no parameters'}")
        if not all(_is_int(value[name]) for name in names):
            raise AnswerError(f"{label}: {tool}'s parameters must be whole numbers, got {value!r}")
        choice = StrategyChoice(tool, **{name: int(value[name]) for name in names})
        lo, hi = self.timing.min_green, self.timing.max_green
        shortest, longest = cycle_bounds(n, self.timing)
        if "favour" in names and not -1 <= choice.favour < n:
            raise AnswerError(f"{label}: favour must be a phase 0..{n - 1} or -1, got {choice.favour}")
        if tool == "webster" and not shortest <= choice.cycle <= longest:
            raise AnswerError(f"{label}: cycle must be {shortest}..{longest} s for {n} phases, got {choice.cycle}")
        if tool == "actuated" and not lo <= choice.min_green <= choice.max_green <= hi:
            raise AnswerError(f"{label}: need {lo:g} <= min_green <= max_green <= {hi:g}, got "
                              f"{choice.min_green} and {choice.max_green}")
        return choice


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
