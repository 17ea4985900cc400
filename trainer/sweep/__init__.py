"""Sweeps: many training runs, each a `reled` command, run here one after another or as Ray tasks.

`reled sweep FILE.toml` and the paper's experiments (tools/experiments/run.py) share this one runner:
``runs`` names a run by its settings, ``steps`` turns runs into commands (reference lines, demonstrations,
training, zero-shot evaluations) that are skipped once their result exists and resumed when stopped,
``execute`` runs them and logs each to OUT/log.jsonl, ``spec`` reads a sweep file.
"""
