"""`python -m trainer` is `reled`."""

from trainer.cli import app

app(prog_name="reled")
