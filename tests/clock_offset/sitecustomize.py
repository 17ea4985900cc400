"""Test hook: a process started with this folder on PYTHONPATH sees its wall clock shifted by
RELED_TEST_CLOCK_OFFSET seconds (a controller whose clock is far behind, without touching the machine's)."""

import os
import time

_OFFSET = float(os.environ.get("RELED_TEST_CLOCK_OFFSET", "0"))
if _OFFSET:
    _real_time = time.time
    time.time = lambda: _real_time() + _OFFSET
