"""`reled-edge`: the intersection controller's command line (deploy and daemon arrive with the edge work)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from edge_runtime import __version__
from edge_runtime.features import MAX_PHASES, SCHEMA_VERSION, feature_names
from edge_runtime.shield import SignalTiming

app = typer.Typer(help="RELED edge runtime: what runs on the intersection controller.", no_args_is_help=True)
console = Console()


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
