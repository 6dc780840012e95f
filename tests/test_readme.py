"""README's test command is the one CI runs, and the params of DVC stages exist."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci_lines = [l for l in (REPO / ".ci/run").read_text().splitlines() if "python3 -m venv" in l]
    assert len(ci_lines) == 1
    setup = re.findall(r"```bash\n([^\n]*python3 -m venv[^\n]*)\n```", readme)
    assert len(setup) == 2, "README keeps exactly two set-up commands"
    assert ci_lines[0] in setup and setup[0].endswith("dvc repro")
