"""mypy over the package's source tree, configured in pyproject.toml. The
generated protobuf modules are read through their .pyi stubs, which the build
(``python setup.py generate_protos``, run by tools/bootstrap.sh) writes."""

from pathlib import Path
import subprocess
import sys

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.linter
def test_mypy() -> None:
    result = subprocess.run([sys.executable, '-m', 'mypy'], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f'mypy found problems:\n{result.stdout}{result.stderr}', pytrace=False)
