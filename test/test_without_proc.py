"""A server and its clients where ``/proc`` is not mounted (a rare container, a
sandbox): the server publishes its socket files as it does with ``/proc``, and
both clients call it on both lanes (the gRPC lane's channel then connects by
path: README, security model). Run in a mount namespace of its own, with an
empty ``/proc``."""

from __future__ import annotations

import grp
import json
import os
from pathlib import Path
import shutil
import subprocess
import sys
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parent / 'servers' / 'proc_less.py'


def other_group() -> str:
    """A group this process is not in by its primary gid: the socket file's group must be set."""
    return next(group.gr_name for group in grp.getgrall() if group.gr_gid != os.getegid())


def run_script(socket_dir: Path, without_proc: bool) -> dict[str, Any]:
    path = socket_dir / ('without.sock' if without_proc else 'with.sock')
    command = [sys.executable, str(SCRIPT), str(path), other_group()]
    if without_proc:
        # A mount namespace of its own (private: the machine's /proc is untouched), /proc emptied.
        command = ['unshare', '-m', 'sh', '-c', 'mount -t tmpfs none /proc && exec "$@"', 'sh', *command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    seen: dict[str, Any] = json.loads(result.stdout.splitlines()[-1])
    seen['files'] = {name.replace(path.stem, 'x'): what for name, what in seen['files'].items()}
    return seen


def test_a_server_without_proc_publishes_the_same_files_and_serves_both_lanes(socket_dir: Path) -> None:
    if os.geteuid() != 0 or shutil.which('unshare') is None:
        pytest.skip('needs root and unshare (util-linux) to hide /proc in a mount namespace')
    with_proc = run_script(socket_dir, without_proc=False)
    without_proc = run_script(socket_dir, without_proc=True)
    assert (with_proc['proc'], without_proc['proc']) == (True, False)
    assert without_proc['files'] == with_proc['files']  # the same mode and group
    assert without_proc['replies'] == with_proc['replies'] == [
        'pong', 'pong', 'grpc', 'pong', 'pong', 'ttrpc', 'pong', 'pong']
    assert without_proc['left'] == with_proc['left'] == []  # both socket files removed at the stop
    # Counted in /proc/net/unix, else among the server's descriptors (it said
    # 0). At least the client's: CI once counted 2, in one of the two runs.
    counts = (without_proc['grpc_connections'], with_proc['grpc_connections'])
    assert min(counts) >= 1, counts
