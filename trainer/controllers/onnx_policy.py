"""An exported policy behind the controller interface: `reled eval --policy policy.onnx` runs the very file a
controller runs (ONNX Runtime, greedy), so a HIL run of that file has a simulation figure to be held to."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edge_runtime.errors import RELEDError
from edge_runtime.policy import OnnxPolicy
from trainer.controllers.base import StackedController
from trainer.rollout import Decision


class OnnxController(StackedController):
    """The model's ``action`` output (its most probable allowed phase) for every light at once."""

    def __init__(self, path: Path):
        self.policy = OnnxPolicy(path)
        meta = self.policy.meta
        self.name = f"onnx:{path.name} (v{meta.policy_version}, {meta.precision})"  # type: ignore[misc]

    def attach(self, env: Any) -> None:
        """Refuse a model exported for other lights: its phase tables must be the scenario's."""
        tables = self.policy.meta.phase_tables
        for inter in env.intersections:
            if tables.get(inter.tls_id) != list(inter.green_states):
                raise RELEDError(f"{self.policy.path} was exported for scenario {self.policy.meta.scenario!r}, whose "
                                 f"light {inter.tls_id!r} {'differs' if inter.tls_id in tables else 'is missing'}: "
                                 "evaluate it on the scenario it was exported for")

    def decide(self, decision: Decision) -> dict[str, int]:
        _logits, actions = self.policy.run(decision.obs, decision.masks)
        return dict(zip(decision.observations, actions.tolist(), strict=True))
