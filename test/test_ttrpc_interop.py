"""An independent ttrpc implementation talks to our fast lane: containerd's Go
package, as Debian ships it, in a small client built here (test/go/).

Needs the Debian packages ``golang-go`` and ``golang-github-containerd-ttrpc-dev``
(which pulls in its dependencies: gogo/protobuf, grpc-go's status, genproto).
It is built in GOPATH mode with the module proxy switched off: nothing is
downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import shutil
import subprocess
import tempfile
from typing import Any, Iterator

import pytest

from test_ttrpc_lanes import Lanes, start_lanes, stop_lanes

HERE = Path(__file__).resolve().parent
GOPATH = Path('/usr/share/gocode')
TTRPC_SOURCE = GOPATH / 'src/github.com/containerd/ttrpc'

pytestmark = pytest.mark.skipif(
    shutil.which('go') is None or not TTRPC_SOURCE.is_dir(),
    reason='needs the Debian packages golang-go and golang-github-containerd-ttrpc-dev '
           '(go and the containerd ttrpc Go source under /usr/share/gocode)')


@pytest.fixture(scope='module')
def go_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Go client, compiled for this run."""
    build = tmp_path_factory.mktemp('go')
    binary = build / 'ttrpc_client'
    env = {
        'PATH': os.environ.get('PATH', '/usr/bin:/bin'),
        'HOME': str(build),
        'GO111MODULE': 'off',
        'GOPATH': str(GOPATH),
        'GOCACHE': str(build / 'cache'),
        'GOPROXY': 'off',
        'GOFLAGS': '',
        'CGO_ENABLED': '0',
    }
    result = subprocess.run(['go', 'build', '-o', str(binary), 'main.go'],
                            cwd=HERE / 'go' / 'ttrpc_client', env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, f'go build failed:\n{result.stdout}\n{result.stderr}'
    return binary


@pytest.fixture(scope='module')
def lanes(test_protos_dir: Path) -> Iterator[Lanes]:
    directory = Path(tempfile.mkdtemp(prefix='tti-', dir='/tmp'))
    popen = start_lanes(test_protos_dir, directory)
    yield Lanes(directory / 'g.sock', directory / 't.sock')
    stop_lanes(popen)
    shutil.rmtree(directory, ignore_errors=True)


def run_go(go_client: Path, lanes: Lanes, *args: str) -> dict[str, Any]:
    result = subprocess.run([str(go_client), str(lanes.ttrpc_path), *args], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, f'Go client failed:\n{result.stdout}\n{result.stderr}'
    return json.loads(result.stdout)


def test_go_client_executes_a_command(go_client: Path, lanes: Lanes) -> None:
    assert run_go(go_client, lanes, 'exec', 'ping') == {'response': {'StatusCode': 0, 'Result': 'pong'}}


def test_go_client_sends_a_parameter_map(go_client: Path, lanes: Lanes) -> None:
    answer = run_go(go_client, lanes, 'exec', 'parameters', 'speed=fast', 'mode=ü')
    assert answer['response']['StatusCode'] == 0
    assert json.loads(answer['response']['Result']) == {'mode': 'ü', 'speed': 'fast'}


def test_go_client_gets_the_command_status_of_an_unknown_command(go_client: Path, lanes: Lanes) -> None:
    answer = run_go(go_client, lanes, 'exec', 'no_such_command')
    assert answer['response']['StatusCode'] == 5  # NOT_FOUND, inside the response
    assert 'no_such_command' in answer['response']['Result']


def test_go_client_gets_unimplemented_for_an_unknown_method(go_client: Path, lanes: Lanes) -> None:
    assert run_go(go_client, lanes, 'unknown') == {
        'error_code': 12, 'error_message': 'Method not found!'}


def test_go_clients_deadline_is_enforced_by_the_server(go_client: Path, lanes: Lanes) -> None:
    # Sleep 30 s with a 0.3 s deadline sent; the Go side itself waits 5 s
    # longer, so DEADLINE_EXCEEDED here is the server's answer.
    answer = run_go(go_client, lanes, 'sleep', '30', '0.3')
    assert answer == {'error_code': 4, 'error_message': 'Deadline Exceeded'}


def test_go_clients_deadline_reaches_the_handler(go_client: Path, lanes: Lanes) -> None:
    answer = run_go(go_client, lanes, 'sleep', '0.01', '30')
    assert answer['response']['WasActive'] is True
    assert 0 < answer['response']['TimeRemaining'] <= 30
