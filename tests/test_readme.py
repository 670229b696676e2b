"""The README's Python examples run as written, each in a fresh interpreter in an empty directory."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.test_package import ROOT, run_python_process

README = Path(ROOT) / "README.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_has_the_two_quick_starts():
    assert len(EXAMPLES) == 2, "one example for an NNI user, one for a PyTorch user"


@pytest.mark.parametrize("code", EXAMPLES, ids=["nni-user", "torch-user"][: len(EXAMPLES)])
def test_readme_example_runs(code, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(code)
    result = run_python_process(str(script), cwd=str(tmp_path), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Warning" not in result.stderr, result.stderr[-3000:]


def test_readme_stays_short_and_shows_the_plot():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert images and all((Path(ROOT) / image).exists() for image in images)
