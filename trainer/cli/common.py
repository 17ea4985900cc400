"""What every `reled` command shares: consoles, the one-line error handling and the progress bar."""

from __future__ import annotations

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from edge_runtime.console import console, err_console, user_errors

__all__ = ["console", "err_console", "progress_bar", "user_errors"]


def progress_bar(*, counts: bool = False) -> Progress:
    """The one progress display of long commands, on stderr so tables on stdout stay clean.

    Off without a terminal (CI logs, pipes), where commands print plain lines instead. ``counts``
    shows done/total (agent-steps) rather than a percentage.
    """
    amount = "{task.completed:,.0f}/{task.total:,.0f}" if counts else "{task.percentage:>3.0f}%"
    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn(amount), TimeElapsedColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(), console=err_console,
                    disable=not err_console.is_terminal)
