"""An independent ttrpc implementation talks to our fast lane: containerd's Go
package, in a small client built here (conftest's ``go_client``).
"""

from __future__ import annotations

import json
from pathlib import Path
import subprocess
from typing import Any

from conftest import ServerProcess


def run_go(go_client: Path, lanes: ServerProcess, *args: str) -> dict[str, Any]:
    result = subprocess.run([str(go_client), str(lanes.ttrpc_path), *args], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, f'Go client failed:\n{result.stdout}\n{result.stderr}'
    return json.loads(result.stdout)


def test_go_client_executes_a_command(go_client: Path, lanes: ServerProcess) -> None:
    assert run_go(go_client, lanes, 'exec', 'ping') == {'response': {'StatusCode': 0, 'Result': 'pong'}}


def test_go_client_sends_a_parameter_map(go_client: Path, lanes: ServerProcess) -> None:
    answer = run_go(go_client, lanes, 'exec', 'parameters', 'speed=fast', 'mode=ü')
    assert answer['response']['StatusCode'] == 0
    assert json.loads(answer['response']['Result']) == {'mode': 'ü', 'speed': 'fast'}


def test_go_client_gets_the_command_status_of_an_unknown_command(go_client: Path, lanes: ServerProcess) -> None:
    answer = run_go(go_client, lanes, 'exec', 'no_such_command')
    assert answer['response']['StatusCode'] == 5  # NOT_FOUND, inside the response
    assert 'no_such_command' in answer['response']['Result']


def test_go_client_gets_unimplemented_for_an_unknown_method(go_client: Path, lanes: ServerProcess) -> None:
    assert run_go(go_client, lanes, 'unknown') == {
        'error_code': 12, 'error_message': 'Method not found!'}


def test_go_clients_deadline_is_enforced_by_the_server(go_client: Path, lanes: ServerProcess) -> None:
    # Sleep 30 s with a 0.3 s deadline sent; the Go side itself waits 5 s
    # longer, so DEADLINE_EXCEEDED here is the server's answer.
    answer = run_go(go_client, lanes, 'sleep', '30', '0.3')
    assert answer == {'error_code': 4, 'error_message': 'Deadline Exceeded'}


def test_go_clients_deadline_reaches_the_handler(go_client: Path, lanes: ServerProcess) -> None:
    answer = run_go(go_client, lanes, 'sleep', '0.01', '30')
    assert answer['response']['WasActive'] is True
    assert 0 < answer['response']['TimeRemaining'] <= 30
