"""The `reled` command tree: every command and command group is attached here, the same way."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.logging import RichHandler

from trainer.cli import demos, evaluate, export, hil, record, scenarios, sweep, train, update
from trainer.cli.common import err_console, user_errors
from trainer.cli.options import SettingsCommand, with_option_groups

app = typer.Typer(help="RELED trainer: SUMO scenarios, multi-agent environment, controllers and evaluation.",
                  no_args_is_help=True, pretty_exceptions_enable=False)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=err_console, show_path=False)])


def command(parent: typer.Typer, name: str, func: Callable[..., Any], **options: Any) -> None:
    """Attach ``func`` as ``name``: option groups expanded, RELEDError as one line, defaults in --help."""
    parent.command(name, cls=SettingsCommand, **options)(user_errors(with_option_groups(func)))


def group(parent: typer.Typer, name: str, help: str) -> typer.Typer:
    """A command group (`reled NAME COMMAND`) attached to ``parent``."""
    sub = typer.Typer(help=help, no_args_is_help=True)
    parent.add_typer(sub, name=name)
    return sub


command(app, "scenarios", scenarios.list_command)
command(app, "eval", evaluate.eval_command)
command(app, "train", train.train_command)
command(app, "compare", train.compare_command)
command(app, "sweep", sweep.sweep_command)
command(app, "export", export.export_command)
command(app, "update", update.update_command)
command(app, "record", record.record_command)

scenario_group = group(app, "scenario", "Inspect and import scenarios.")
# `reled scenarios` is the spelling the docs and error messages use; `reled scenario list` stays, hidden.
command(scenario_group, "list", scenarios.list_command, hidden=True, help="Same as `reled scenarios`.")
command(scenario_group, "show", scenarios.show_command)
command(scenario_group, "import", scenarios.import_command)

demos_group = group(app, "demos", "LLM expert demonstrations (SED): generate them, inspect them.")
command(demos_group, "generate", demos.generate_command)
command(demos_group, "show", demos.show_command)

hil_group = group(app, "hil", "Hardware-in-the-loop: a fleet's controllers drive a SUMO city over MQTT.")
command(hil_group, "run", hil.run_command)
command(app, "loop", hil.loop_command)
