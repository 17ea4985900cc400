"""Test-wide setup: RELED's user data goes to a temp folder, never to the developer's home."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_HOME = Path(tempfile.mkdtemp(prefix="reled-test-home-"))
os.environ["RELED_HOME"] = str(_HOME)


@pytest.fixture(scope="session")
def reled_home() -> Path:
    return _HOME
