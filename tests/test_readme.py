"""The README's set-up commands are the ones CI runs, and its layout names real paths."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def test_readme_starts_with_the_two_setup_commands() -> None:
    first, second = (b.strip() for b in _blocks()[:2])
    assert first.endswith("fedloom simulate") and "pip install torch==2.13.0 -e ." in first
    assert second.endswith("pytest -q -p no:cacheprovider") and "'.[dev]'" in second
    assert README.index(first) < README.index("## What it does")


def test_ci_runs_the_readme_test_command() -> None:
    out = subprocess.run(
        ["awk", r'/^```bash$/{n++; next} /^```$/{next} n==2 && !done {print; done=1}', str(ROOT / "README.md")],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert out == _blocks()[1].strip()
    assert "awk" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_layout_paths_exist() -> None:
    layout = README.split("## Layout", 1)[1].split("## ", 1)[0]
    for path in re.findall(r"^\s*((?:fedloom|protos|scripts|tests|benchmarks|examples|docs)/[\w/.*]*)", layout, re.M):
        base = path.split("*")[0].rstrip("/")
        assert (ROOT / base).exists() or list(ROOT.glob(path)), path
