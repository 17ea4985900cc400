"""`python -m edge_runtime` = `reled-edge`."""

from edge_runtime.cli import app

app(prog_name="reled-edge")
