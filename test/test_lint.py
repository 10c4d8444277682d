"""ruff over the source tree, configured in pyproject.toml: pycodestyle,
pyflakes, bugbear, pep257 docstrings and import order."""

from pathlib import Path
import subprocess
import sys

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.linter
def test_ruff() -> None:
    result = subprocess.run([sys.executable, '-m', 'ruff', 'check', '--no-fix', '.'],
                            cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f'ruff found problems:\n{result.stdout}{result.stderr}', pytrace=False)
