"""What every `reled` command shares: consoles and the one-line error handling."""

from __future__ import annotations

from typing import Annotated

import typer

from edge_runtime.console import console, err_console, user_errors

__all__ = ["console", "err_console", "user_errors"]

# Environment options shared by `reled eval` and `reled train`. None means "not given", so a value from
# the --config file is kept; the help shows the value used when neither gives one.
BackendOption = Annotated[str | None, typer.Option(help="libsumo (fast) or traci (sockets) \\[default: libsumo]")]
RewardOption = Annotated[str | None, typer.Option(help="Reward reported to agents: queue, wait or pressure "
                                                      "\\[default: queue]")]
EpisodeSecondsOption = Annotated[float | None, typer.Option(help="Shorter episodes \\[default: the scenario's "
                                                                 "begin..end]")]
