"""ruff over the source tree, configured in pyproject.toml: pycodestyle,
pyflakes, bugbear, pep257 docstrings and import order; and the size of the
package's modules."""

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


#: Issue 13: a module that outgrows this does more than one job; split it.
MAX_MODULE_LINES = 600


@pytest.mark.linter
def test_no_module_of_the_package_outgrows_one_job() -> None:
    too_long = {}
    for module in sorted((ROOT / 'vyra_base_ipc').rglob('*.py')):
        if module.name.endswith(('_pb2.py', '_pb2_grpc.py', '_pb2.pyi')):
            continue  # generated
        lines = len(module.read_text().splitlines())
        if lines > MAX_MODULE_LINES:
            too_long[str(module.relative_to(ROOT))] = lines
    assert too_long == {}, f'modules over {MAX_MODULE_LINES} lines: {too_long}'
