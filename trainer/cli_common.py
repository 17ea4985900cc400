"""What every `reled` command shares: consoles and the one-line error handling."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from edge_runtime.errors import RELEDError

# Wide tables when piped (CI logs, files) instead of rich's 80-column default.
console = Console() if sys.stdout.isatty() else Console(width=160)
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def user_errors(func: F) -> F:
    """Turn RELEDError into one red line on stderr and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except RELEDError as exc:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


# Environment options shared by `reled eval` and `reled train`. None means "not given", so a value from
# the --config file is kept; the help shows the value used when neither gives one.
BackendOption = Annotated[str | None, typer.Option(help="libsumo (fast) or traci (sockets) \\[default: libsumo]")]
RewardOption = Annotated[str | None, typer.Option(help="Reward reported to agents: queue, wait or pressure "
                                                      "\\[default: queue]")]
EpisodeSecondsOption = Annotated[float | None, typer.Option(help="Shorter episodes \\[default: the scenario's "
                                                                 "begin..end]")]
