""".ci/other-pythons, CI's runs on the other Python versions: in a copy of
it in a checkout of its own, whose requirements are installed already (pip)
and whose "tests" are a stand-in ``pytest`` module that says which Python
ran it and fails when told to. Real interpreters, virtual environments and
pip; skipped where the version it runs is not installed."""

from __future__ import annotations

import os
from pathlib import Path
import shutil
import subprocess
import sys
import venv

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: A version other than this Python's, which the script looks for.
OTHER = '3.13' if sys.version_info[:2] == (3, 12) else '3.12'

#: The stand-in for pytest (``python -m pytest`` finds it in the checkout):
#: appends its Python's version to $RAN and exits with $EXIT_CODE.
FAKE_PYTEST = """import os, sys
with open(os.environ['RAN'], 'a') as ran:
    ran.write('%d.%d\\n' % sys.version_info[:2])
sys.exit(int(os.environ.get('EXIT_CODE', '0')))
"""


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A checkout with the script, requirements pip has already, a setup.py that does nothing."""
    (tmp_path / '.ci').mkdir()
    shutil.copy2(ROOT / '.ci' / 'other-pythons', tmp_path / '.ci' / 'other-pythons')
    (tmp_path / 'requirements.txt').write_text('pip\n')  # (nothing to download)
    (tmp_path / 'setup.py').write_text('')
    (tmp_path / 'pytest.py').write_text(FAKE_PYTEST)
    return tmp_path


def run(checkout: Path, *arguments: str, exit_code: int = 0) -> tuple[int, list[str]]:
    """Run the script; its exit status, and the versions the stand-in ran on."""
    ran = checkout / 'ran'
    result = subprocess.run([str(checkout / '.ci' / 'other-pythons'), *arguments], capture_output=True, text=True,
                            timeout=600, env={**os.environ, 'RAN': str(ran), 'EXIT_CODE': str(exit_code)})
    if f'no Python {OTHER} here' in result.stderr:
        pytest.skip(f'no Python {OTHER} here')
    versions = ran.read_text().split() if ran.exists() else []
    ran.unlink(missing_ok=True)
    return result.returncode, versions


def test_a_virtual_environment_left_by_another_interpreter_is_made_anew(checkout: Path) -> None:
    # Found: venv over an existing one rewrites its pyvenv.cfg but keeps its
    # python3 link to the interpreter that made it: an earlier run's (another
    # patch release, one since removed), whose tests then ran on that Python
    # (or could not start).
    venv.create(checkout / f'.venv-{OTHER}', with_pip=True)  # (this Python's: another version than OTHER)
    assert run(checkout, OTHER, 'test_x.py') == (0, [OTHER])
    assert run(checkout, OTHER, 'test_x.py') == (0, [OTHER])  # the second time, reused as it is


def test_a_failing_run_fails_the_script(checkout: Path) -> None:
    status, versions = run(checkout, OTHER, 'test_x.py', exit_code=1)
    assert (status, versions) == (1, [OTHER])
