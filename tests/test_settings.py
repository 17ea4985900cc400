"""The one settings loader: every section of every file reads the same way and every mistake is named."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from edge_runtime.errors import RELEDError
from edge_runtime.settings import build_section, read_sections


@dataclass(frozen=True)
class Sample:
    name: str
    count: int = 1
    ratio: float = 0.5
    enabled: bool = False
    tags: tuple[str, ...] = ()
    model: Path | None = None
    mode: Literal["a", "b"] = "a"


def build(values: dict, base: Path | None = None) -> Sample:
    return build_section("file.toml", "sample", values, Sample, base=base)


def test_values_are_converted_by_type_hints(tmp_path):
    got = build({"name": "x", "count": 3, "ratio": 2, "enabled": True, "tags": ["p", "q"], "model": "m.gguf"},
                base=tmp_path)
    assert got == Sample("x", 3, 2.0, True, ("p", "q"), (tmp_path / "m.gguf").resolve())
    assert isinstance(got.ratio, float)
    assert build({"name": "x", "model": ""}).model is None  # an empty string switches an optional path off


@pytest.mark.parametrize(("values", "message"), [
    ({"name": "x", "cuont": 2}, r"file.toml: unknown key\(s\) \['cuont'\] in \[sample\]; allowed: "),
    ({"name": "x", "count": 1.5}, r"file.toml: \[sample\] count = 1.5 should be int"),
    ({"name": "x", "count": True}, r"\[sample\] count = True should be int"),
    ({"name": "x", "ratio": "fast"}, r"\[sample\] ratio = 'fast' should be float"),
    ({"name": "x", "enabled": "yes"}, r"\[sample\] enabled = 'yes' should be bool"),
    ({"name": "x", "tags": "p"}, r"\[sample\] tags = 'p' should be a list"),
    ({"name": 7}, r"\[sample\] name = 7 should be str"),
    ({"name": "x", "model": 3}, r"\[sample\] model = 3 should be Path or none"),
    ({}, r"file.toml: \[sample\] is missing 'name'"),
])
def test_mistakes_are_named(values, message):
    with pytest.raises(RELEDError, match=message):
        build(values)


def test_files_with_unknown_sections_or_plain_values_are_refused(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[sample]\nname = 'x'\n[extra]\na = 1\n")
    with pytest.raises(RELEDError, match=r"unknown section\(s\) \['extra'\]; expected \[sample\]"):
        read_sections(path, ["sample"])
    path.write_text("sample = 3\n")
    with pytest.raises(RELEDError, match="'sample' must be a \\[sample\\] section"):
        read_sections(path, ["sample"])
    path.write_text("[sample\n")
    with pytest.raises(RELEDError, match="is not valid TOML"):
        read_sections(path, ["sample"])
