"""The code is clean under ruff (its rules: pyproject.toml [tool.ruff]), checked with the suite
so that CI, which runs the README's test command, runs the linter too."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    if "No module named ruff" in r.stderr:
        raise AssertionError("ruff is not installed: pip install -e '.[test]' installs it")
    assert r.returncode == 0, f"ruff check found problems (fix them, or `ruff check --fix .`):\n{r.stdout[-6000:]}"
