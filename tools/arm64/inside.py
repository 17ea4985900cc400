"""Runs inside the arm64 root (tools/arm64/run.py): what this platform is, a policy's self-test, its decision
time, and its logits on given observations.

`python inside.py POLICY OUT.json [OBS.npz LOGITS.npz]`: the self-test is the one a controller's shadow test
replays (``OnnxPolicy.self_test``); with OBS.npz (``obs``, ``mask``) the logits and actions for those rows go to
LOGITS.npz, for run.py to compare with the same policy on x86.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime

from edge_runtime.policy import OnnxPolicy

TIMED = 200  # decisions timed for the p50/p99


def main(argv: list[str]) -> int:
    policy = OnnxPolicy(Path(argv[0]))
    problem = policy.self_test()
    obs = np.asarray(policy.meta.selftest.obs[0], dtype=np.float32)
    mask = np.asarray(policy.meta.selftest.mask[0], dtype=bool)
    seconds = []
    for _ in range(TIMED):
        start = time.perf_counter()
        policy.decide(obs, mask)
        seconds.append(time.perf_counter() - start)
    report = {"machine": platform.machine(), "python": platform.python_version(),
              "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
              "selftest": problem or "passed", "selftest_rows": len(policy.meta.selftest.obs),
              "decide_ms_p50": float(np.percentile(seconds, 50) * 1000),
              "decide_ms_p99": float(np.percentile(seconds, 99) * 1000)}
    if len(argv) > 2:
        with np.load(argv[2]) as rows:
            logits, actions = policy.run(rows["obs"], rows["mask"])
        np.savez(argv[3], logits=logits, actions=actions)
    Path(argv[1]).write_text(json.dumps(report))
    return 0 if problem is None else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
