"""Mean ± std over seeds or runs: one definition for `reled eval`, `reled train` and `reled compare`."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1): 0 with one value, since one seed has no spread; NaN with none."""
    arr = np.asarray(values, dtype=float)
    if not arr.size:
        return math.nan, math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0
