"""The documented import ``from vyra_base.com.handler.ipc import IPCHandler``
beside an installed upstream ``vyra_base``, which is a regular package: with
a stand-in of it, the import fails as in every real VYRA install, and works
once upstream's ``__init__.py`` files extend their ``__path__`` (the one-line
change the README shows)."""

from __future__ import annotations

import os
from pathlib import Path
import subprocess
import sys

import pytest

EXTEND = '__path__ = __import__("pkgutil").extend_path(__path__, __name__)\n'
PROBE = """
import vyra_base.com.handler.ros2 as upstream_module
from vyra_base.com.handler.ipc import IPCHandler
import vyra_base_ipc
print(upstream_module.UPSTREAM, IPCHandler is vyra_base_ipc.IPCHandler)
"""


def upstream_vyra_base(root: Path, extend_path: bool) -> Path:
    """A regular ``vyra_base`` package as upstream ships it (``__init__.py``
    at every level, a module of its own in ``com/handler``)."""
    handler = root / 'vyra_base' / 'com' / 'handler'
    handler.mkdir(parents=True)
    for package in (root / 'vyra_base', root / 'vyra_base' / 'com', handler):
        (package / '__init__.py').write_text(f'"""upstream {package.name}"""\n' + (EXTEND if extend_path else ''))
    (handler / 'ros2.py').write_text('UPSTREAM = "upstream-ros2-handler"\n')
    return root


def probe(upstream: Path) -> subprocess.CompletedProcess[str]:
    # Upstream first on the path, as an underlay or site-packages entry would be.
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(upstream), *filter(None, sys.path)])}
    return subprocess.run([sys.executable, '-c', PROBE], env=env, capture_output=True, text=True, timeout=60)


def test_without_extend_path_the_documented_import_fails(tmp_path: Path) -> None:
    result = probe(upstream_vyra_base(tmp_path, extend_path=False))
    assert result.returncode != 0
    assert "ModuleNotFoundError: No module named 'vyra_base.com.handler.ipc'" in result.stderr


def test_with_extend_path_our_portion_is_found_and_upstream_stays(tmp_path: Path) -> None:
    result = probe(upstream_vyra_base(tmp_path, extend_path=True))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ['upstream-ros2-handler', 'True']


def test_without_upstream_the_documented_import_works() -> None:
    result = subprocess.run([sys.executable, '-c', 'from vyra_base.com.handler.ipc import IPCHandler; '
                             'import vyra_base_ipc; print(IPCHandler is vyra_base_ipc.IPCHandler)'],
                            capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == 'True', result.stderr


@pytest.mark.parametrize('level', ['vyra_base', 'vyra_base/com', 'vyra_base/com/handler'])
def test_every_level_needs_the_line(tmp_path: Path, level: str) -> None:
    upstream = upstream_vyra_base(tmp_path, extend_path=True)
    init = upstream / level / '__init__.py'
    init.write_text(init.read_text().replace(EXTEND, ''))
    assert probe(upstream).returncode != 0
