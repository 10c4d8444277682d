"""The socket's directory against other local users (issue 15, item 1):
directories others own or may write are refused before anything binds, a
lock nobody else can hold serializes publishers, and nothing another user
plants is followed. Servers in this process; the other user is a real second
uid (``setpriv``) where it acts."""

from __future__ import annotations

import os
from pathlib import Path
import shutil
import stat
import subprocess
from typing import Iterator

import pytest

from conftest import NOBODY, OTHER_UID
from vyra_base_ipc import IPCServer, ModuleService, UnsafeDirectoryError

pytestmark = [pytest.mark.asyncio, pytest.mark.fault]



def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip('needs root to give directories to another uid and run a process as it')


def server(path: Path, **options: object) -> IPCServer:
    return IPCServer(path, servicers=[ModuleService('unit')], **options)  # type: ignore[arg-type]



@pytest.mark.parametrize('owner, mode, why', [
    (OTHER_UID, 0o777, 'it belongs to uid 65533'),
    (OTHER_UID, 0o755, 'it belongs to uid 65533'),
    (0, 0o777, 'other users may write to it (mode 0777)'),
    (0, 0o775, 'other users may write to it (mode 0775)'),
    (OTHER_UID, 0o1777, 'it belongs to uid 65533'),  # sticky, but not root's
])
async def test_a_directory_others_own_or_may_write_is_refused_naming_it(open_dir: Path, owner: int,
                                                                        mode: int, why: str) -> None:
    needs_root()
    robot = open_dir / 'robot'
    robot.mkdir()
    os.chown(robot, owner, owner)
    robot.chmod(mode)
    ipc = server(robot / 'x_ipc.sock')
    with pytest.raises(UnsafeDirectoryError) as error:
        await ipc.start()
    assert f"cannot serve below '{robot}'" in str(error.value) and why in str(error.value)
    assert list(robot.iterdir()) == []  # nothing was created or bound there


async def test_a_safe_directory_below_an_unsafe_one_is_refused(open_dir: Path) -> None:
    unsafe = open_dir / 'shared'
    unsafe.mkdir()
    unsafe.chmod(0o777)  # anyone could rename 'robot' and put their own in its place
    (unsafe / 'robot').mkdir(mode=0o700)
    with pytest.raises(UnsafeDirectoryError, match="below '.*shared': other users may write"):
        await server(unsafe / 'robot' / 'x_ipc.sock').start()


async def test_a_root_owned_sticky_directory_like_tmp_is_accepted(open_dir: Path) -> None:
    tmp_like = open_dir / 'tmp'
    tmp_like.mkdir()
    tmp_like.chmod(0o1777)
    async with server(tmp_like / 'x_ipc.sock') as ipc:
        assert ipc.socket_path.is_socket()
    assert list(tmp_like.iterdir()) == []  # no lock file or private directory left either


async def test_directories_the_server_makes_pass_its_own_check(socket_dir: Path) -> None:
    path = socket_dir / 'run' / 'robot' / 'x_ipc.sock'
    async with server(path, socket_group=NOBODY if os.geteuid() == 0 else None):
        for directory in (socket_dir / 'run', path.parent):
            mode = stat.S_IMODE(directory.stat().st_mode)
            assert mode in (0o700, 0o750) and not mode & stat.S_IWGRP


#: Holds a shared flock on the directory argv[1] until its stdin closes.
HOLD_FLOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
fcntl.flock(fd, fcntl.LOCK_SH)
print('locked', flush=True)
sys.stdin.read()
"""


@pytest.fixture
def as_other_user() -> Iterator[list[subprocess.Popen[str]]]:
    needs_root()
    if shutil.which('setpriv') is None:
        pytest.skip('setpriv (util-linux) is not installed')
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.stdin is not None:
            process.stdin.close()
        process.wait(timeout=20)
        if process.stdout is not None:
            process.stdout.close()


async def test_another_users_flock_on_the_directory_does_not_delay_the_start(
        open_dir: Path, as_other_user: list[subprocess.Popen[str]]) -> None:
    """`flock --shared /tmp sleep 30` stopped every server in /tmp from starting."""
    holder = subprocess.Popen(
        ['setpriv', f'--reuid={OTHER_UID}', f'--regid={OTHER_UID}', '--clear-groups', '/usr/bin/python3',
         '-c', HOLD_FLOCK, str(open_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={'PATH': '/usr/bin:/bin'})
    as_other_user.append(holder)
    assert holder.stdout is not None and holder.stdout.readline().strip() == 'locked'
    async with server(open_dir / 'x_ipc.sock') as ipc:  # the lock file is ours alone
        assert ipc.socket_path.is_socket()


#: Plants symlinks to argv[1] at every name in argv[2:] (again and again,
#: as fast as it can) until its stdin closes; says "ready" after the first round.
PLANT = """
import os, select, sys
victim, names = sys.argv[1], sys.argv[2:]
first = True
while True:
    for name in names:
        try:
            os.symlink(victim, name)
        except OSError:
            pass
    if first:
        print('ready', flush=True)
        first = False
    if select.select([sys.stdin], [], [], 0)[0]:
        break
"""


async def test_symlinks_another_user_plants_are_never_followed(
        open_dir: Path, as_other_user: list[subprocess.Popen[str]], tmp_path: Path) -> None:
    """In a /tmp-like directory another user plants symlinks to a root-only
    file at every name a server creates beside its socket (its lock, the
    sockets themselves) while servers with a socket group start: the file's
    owner and mode never change."""
    victim = tmp_path / 'victim'
    victim.write_text('root only')
    victim.chmod(0o600)
    tmp_like = open_dir / 'tmp'
    tmp_like.mkdir()
    tmp_like.chmod(0o1777)
    names = [str(tmp_like / name) for index in range(10)
             for name in (f'.x{index}_ipc.sock.lock', f'.x{index}_ipc.ttrpc.sock.lock',
                          f'x{index}_ipc.sock', f'x{index}_ipc.ttrpc.sock')]
    planter = subprocess.Popen(
        ['setpriv', f'--reuid={OTHER_UID}', f'--regid={OTHER_UID}', '--clear-groups', '/usr/bin/python3',
         '-c', PLANT, str(victim), *names], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={'PATH': '/usr/bin:/bin'})
    as_other_user.append(planter)
    assert planter.stdout is not None and planter.stdout.readline().strip() == 'ready'
    outcomes = []
    for index in range(10):
        ipc = server(tmp_like / f'x{index}_ipc.sock', socket_group=NOBODY)
        try:
            await ipc.start()
            outcomes.append('started')
        except OSError as error:
            outcomes.append(type(error).__name__)
        finally:
            await ipc.stop()
    info = victim.stat()
    assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o600, 0, 0)
    assert victim.read_text() == 'root only'
    # Every planted name was refused, not followed.
    assert set(outcomes) <= {'UnsafeDirectoryError', 'FileExistsError'}, outcomes


async def test_a_missing_directory_another_user_put_a_symlink_in_place_of_is_refused(
        open_dir: Path, as_other_user: list[subprocess.Popen[str]]) -> None:
    """The audit's finding: another user's link at the socket's missing parent
    (``/tmp/shared/vyra`` -> any root-owned directory) chose where root's
    server made its sockets: there, with that directory's mode."""
    chosen = open_dir / 'chosen'
    chosen.mkdir(mode=0o755)
    tmp_like = open_dir / 'tmp'
    tmp_like.mkdir()
    tmp_like.chmod(0o1777)
    subprocess.run(['setpriv', f'--reuid={OTHER_UID}', f'--regid={OTHER_UID}', '--clear-groups', '/usr/bin/python3',
                    '-c', 'import os, sys; os.symlink(sys.argv[1], sys.argv[2])', str(chosen),
                    str(tmp_like / 'vyra')], check=True, timeout=30, env={'PATH': '/usr/bin:/bin'})
    ipc = server(tmp_like / 'vyra' / 'mod_ipc.sock')
    with pytest.raises(UnsafeDirectoryError) as error:
        await ipc.start()
    await ipc.stop()
    assert (f"cannot serve below {str(tmp_like / 'vyra')!r}: it is a symbolic link of uid {OTHER_UID}"
            in str(error.value)), error.value
    assert os.listdir(chosen) == []


@pytest.mark.parametrize('planted', ['symlink', 'file'])
async def test_a_lock_name_another_user_took_is_refused_naming_its_owner(
        open_dir: Path, as_other_user: list[subprocess.Popen[str]], planted: str) -> None:
    # Where all may write, the name cannot be taken back from them (README):
    # the start fails and says by whom. (A symlink said only "Permission
    # denied" where fs.protected_symlinks refuses it.)
    tmp_like = open_dir / 'tmp'
    tmp_like.mkdir()
    tmp_like.chmod(0o1777)
    make = ('os.symlink("/etc/passwd", sys.argv[1])' if planted == 'symlink'
            else 'open(sys.argv[1], "w").close()')
    subprocess.run(['setpriv', f'--reuid={OTHER_UID}', f'--regid={OTHER_UID}', '--clear-groups', '/usr/bin/python3',
                    '-c', f'import os, sys; {make}', str(tmp_like / '.x_ipc.sock.lock')],
                   check=True, timeout=30, env={'PATH': '/usr/bin:/bin'})
    ipc = server(tmp_like / 'x_ipc.sock')
    with pytest.raises(UnsafeDirectoryError) as error:
        await ipc.start()
    await ipc.stop()
    words = f'is a symlink of uid {OTHER_UID}' if planted == 'symlink' else f'belongs to uid {OTHER_UID}'
    assert f"the lock file '.x_ipc.sock.lock' beside the socket {words}" in str(error.value), error.value
