"""The tree is formatted and linted by ruff with the rules in pyproject.toml, so CI (which runs this suite)
refuses a change that is not."""

import subprocess
import sys

from helpers import REPO


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_the_tree_is_formatted():
    result = _ruff("format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr + "\nfix with: ruff format ."


def test_the_tree_passes_the_lint_rules():
    result = _ruff("check", ".")
    assert result.returncode == 0, result.stdout + result.stderr + "\nsee: ruff check ."
