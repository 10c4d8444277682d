"""Ctrl-C while ``vyra-ipc`` still imports: a real process started as its
console script starts it, held inside its import of ``grpc`` (by a
``sitecustomize`` module the test puts on its PYTHONPATH) until the test lets
it go, and a real SIGINT delivered while it is held there."""

from __future__ import annotations

import ast
import contextlib
import errno
import os
from pathlib import Path
import signal
import subprocess
import sys
from typing import Iterator

from conftest import wait_for

REPO = Path(__file__).resolve().parent.parent

#: A ``sitecustomize`` module on the process's PYTHONPATH (Python imports it
#: as it starts; this environment has none of its own): the first ``import
#: grpc``, inside the import of vyra_base_ipc, creates $IMPORT_MARK and then
#: waits until a writer opens the fifo $IMPORT_RELEASE.
_GATE = """
import os
import sys


class GrpcGate:
    def find_spec(self, name, path=None, target=None):
        if name != 'grpc':
            return None
        sys.meta_path.remove(self)
        open(os.environ['IMPORT_MARK'], 'x').close()
        with open(os.environ['IMPORT_RELEASE'], 'rb') as gate:
            gate.read()
        return None


sys.meta_path.insert(0, GrpcGate())
"""


def console_script(name: str) -> str:
    """The Python code the console script ``name`` of setup.py runs."""
    tree = ast.parse((REPO / 'setup.py').read_text())
    call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call)
                and getattr(node.func, 'id', None) == 'setup')
    keyword = next(keyword for keyword in call.keywords if keyword.arg == 'entry_points')
    scripts = dict(line.replace(' ', '').split('=') for line in ast.literal_eval(keyword.value)['console_scripts'])
    module, function = scripts[name].split(':')
    return f'import sys; from {module} import {function}; sys.exit({function}())'


def release(fifo: Path, process: subprocess.Popen[str]) -> None:
    """Let ``process``, held in its import, go on, once it reads the fifo
    (nothing happens once it has ended)."""
    def opened() -> bool:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            return True
        except OSError as error:
            # ENXIO: no reader yet. The process makes its mark before it opens
            # the fifo: under load it may not be there yet (then it would wait
            # for ever for a writer that already came), or it has ended.
            assert error.errno == errno.ENXIO, error
            return process.poll() is not None
    wait_for(opened, 60, 'the held import to wait at its gate')


@contextlib.contextmanager
def held_cli(tmp_path: Path, ignore_sigint: bool = False) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """``vyra-ipc list DIR`` (an empty DIR), held inside its import, with the
    fifo that lets it go on; killed at the end if it still runs. With
    ``ignore_sigint``, started with SIGINT ignored."""
    mark, fifo, gate = tmp_path / 'importing', tmp_path / 'release', tmp_path / 'gate'
    os.mkfifo(fifo)
    gate.mkdir()
    (gate / 'sitecustomize.py').write_text(_GATE)
    (tmp_path / 'sockets').mkdir()
    python_path = os.pathsep.join(filter(None, [str(gate), os.environ.get('PYTHONPATH')]))
    process = subprocess.Popen(
        [sys.executable, '-c', console_script('vyra-ipc'), 'list', str(tmp_path / 'sockets')],
        env={**os.environ, 'PYTHONPATH': python_path, 'IMPORT_MARK': str(mark), 'IMPORT_RELEASE': str(fifo)},
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None)
    try:
        wait_for(lambda: mark.exists() or process.poll() is not None, 60, 'the import of grpc')
        assert process.poll() is None, process.communicate()
        yield process, fifo
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()


def test_ctrl_c_while_it_imports_exits_130_at_once_without_a_traceback(tmp_path: Path) -> None:
    # Found: a KeyboardInterrupt traceback (the import takes a third of a
    # second), the process killed by SIGINT; once a verb runs, Ctrl-C gives 130
    # and nothing on the terminal, and so it does now from the entry point's first line.
    with held_cli(tmp_path) as (process, _):
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)  # never let go: it leaves without finishing the import
    assert (process.returncode, out, err) == (130, '', '')


def test_without_ctrl_c_the_held_import_goes_on_and_the_verb_runs(tmp_path: Path) -> None:
    with held_cli(tmp_path) as (process, fifo):
        release(fifo, process)
        out, err = process.communicate(timeout=60)
    assert (process.returncode, err) == (0, ''), out
    assert out.startswith('no IPC server sockets in ')


def test_a_sigint_ignored_from_the_start_stays_ignored_while_it_imports(tmp_path: Path) -> None:
    # A background job of a script (or nohup) starts with SIGINT ignored: a
    # Ctrl-C on the terminal is not for it. The kernel drops an ignored signal
    # when it is sent, so there is nothing to wait for before letting it go.
    with held_cli(tmp_path, ignore_sigint=True) as (process, fifo):
        process.send_signal(signal.SIGINT)
        release(fifo, process)
        out, err = process.communicate(timeout=60)
    assert (process.returncode, err) == (0, ''), out
