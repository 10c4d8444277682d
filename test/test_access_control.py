"""Who may connect: file modes that do not depend on the umask, an optional
group, and a real second user refused (issue 4, guarantee 4)."""

from __future__ import annotations

import os
from pathlib import Path
import shutil
import stat
import subprocess

import pytest

from conftest import NOBODY, OTHER_UID, ServerProcess

pytestmark = pytest.mark.fault



def modes(path: Path) -> tuple[int, int]:
    info = path.stat()
    return stat.S_IMODE(info.st_mode), info.st_gid


@pytest.mark.parametrize('umask', [0o000, 0o077, 0o022])
def test_default_modes_do_not_depend_on_the_umask(start_server, socket_dir: Path, umask: int) -> None:
    path = socket_dir / 'run' / 'x.sock'
    start_server(path, umask=umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


@pytest.mark.parametrize('umask', [0o000, 0o077])
def test_group_modes_do_not_depend_on_the_umask(start_server, socket_dir: Path, umask: int) -> None:
    path = socket_dir / 'run' / 'x.sock'
    start_server(path, '--socket-group', 'nogroup', umask=umask)
    assert modes(path) == (0o660, NOBODY)
    assert modes(path.parent) == (0o750, NOBODY)


def test_unknown_group_is_a_clear_error(start_server, socket_path: Path) -> None:
    process = start_server(socket_path, '--socket-group', 'no_such_group_here', wait=False)
    assert process.wait() != 0
    assert "socket_group 'no_such_group_here': no such group" in process.log()


def connect_as(uid: int, gid: int, path: Path) -> str:
    """Try to connect to ``path`` as another user; return 'connected' or the error name."""
    if os.geteuid() != 0:
        pytest.skip('needs root to run a process as another uid')
    if shutil.which('setpriv') is None:
        pytest.skip('setpriv (util-linux) is not installed')
    probe = ('import socket,sys\n'
             's=socket.socket(socket.AF_UNIX)\n'
             'try:\n s.connect(sys.argv[1]); print("connected")\n'
             'except OSError as e: print(type(e).__name__)\n')
    # The system interpreter: the test's own may live under a home only root can read.
    result = subprocess.run(
        ['setpriv', f'--reuid={uid}', f'--regid={gid}', '--clear-groups', '/usr/bin/python3', '-c', probe,
         str(path)], capture_output=True, text=True, timeout=30, env={'PATH': '/usr/bin:/bin'})
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()



def test_another_user_cannot_connect_by_default(start_server, open_dir: Path) -> None:
    server = start_server(open_dir / 'x.sock')
    assert connect_as(OTHER_UID, OTHER_UID, server.socket_path) == 'PermissionError'
    assert connect_as(os.getuid(), os.getgid(), server.socket_path) == 'connected'


def test_a_member_of_the_socket_group_may_connect_others_not(start_server, open_dir: Path) -> None:
    server: ServerProcess = start_server(open_dir / 'grp' / 'x.sock', '--socket-group', 'nogroup')
    assert connect_as(OTHER_UID, NOBODY, server.socket_path) == 'connected'
    assert connect_as(OTHER_UID, OTHER_UID, server.socket_path) == 'PermissionError'
