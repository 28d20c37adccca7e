"""The README's Python examples and the docstring examples run as written."""

from __future__ import annotations

import doctest
import re
from pathlib import Path

import pytest

import ghostfunc._graddot

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_python_blocks_run(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # what the examples save (runs/values.pt) goes to a scratch folder, not the checkout
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})


def test_docstring_examples():
    result = doctest.testmod(ghostfunc._graddot, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
