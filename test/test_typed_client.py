"""What type checkers and misspellings see of the clients (issue: typing and
wrong messages): results typed by ``response_type=``, shown with mypy on a
user's file; keyword arguments named and checked; a wrong response type
refused before anything is sent."""

from __future__ import annotations

from pathlib import Path
import re
import subprocess
import sys

import pytest

from conftest import ServerProcess
from vyra_base_ipc import IPCHandler, SyncIPCHandler
from vyra_base_ipc.backend_service_pb2 import StatusRequest, StatusResponse
from vyra_base_ipc.backend_service_pb2_grpc import BackendServiceStub
from vyra_base_ipc.module_service_pb2 import CommandResponse

ROOT = Path(__file__).resolve().parent.parent

USER_CODE = """
from vyra_base_ipc import IPCHandler, SyncIPCHandler
from vyra_base_ipc.backend_service_pb2 import StatusRequest, StatusResponse

def blocking(ipc: SyncIPCHandler) -> None:
    reveal_type(ipc.call_method('GetStatus', StatusRequest(), response_type=StatusResponse))
    reveal_type(ipc.stream_method('GetStatus', StatusRequest(), response_type=StatusResponse))
    reveal_type(ipc.call_method('GetStatus', StatusRequest()))

async def frontend(ipc: IPCHandler) -> None:
    status = await ipc.call_method('GetStatus', StatusRequest(), response_type=StatusResponse)
    reveal_type(status)
    reveal_type(ipc.stream_method('GetStatus', StatusRequest(), response_type=StatusResponse))
    async for update in ipc.stream_method('GetStatus', StatusRequest(), response_type=StatusResponse):
        reveal_type(update)
    status.uptime_secs
"""


@pytest.mark.linter
def test_mypy_sees_the_response_type_of_calls_and_streams(tmp_path: Path) -> None:
    user = tmp_path / 'frontend.py'
    user.write_text(USER_CODE)
    result = subprocess.run([sys.executable, '-m', 'mypy', '--config-file', str(ROOT / 'pyproject.toml'),
                             '--cache-dir', str(tmp_path / 'cache'), str(user)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    revealed = re.findall(r'Revealed type is "(.*)"', result.stdout)
    response = 'vyra_base_ipc.backend_service_pb2.StatusResponse'
    # Streams are generators: a caller leaving one early can close() / aclose() it.
    assert revealed == [response, f'typing.Generator[{response}, None, None]', 'Any', response,
                        f'typing.AsyncGenerator[{response}, None]', response], result.stdout
    # A misspelt field of the typed result is an error the user sees before running anything.
    assert '"StatusResponse" has no attribute "uptime_secs"' in result.stdout, result.stdout


def test_a_misspelt_keyword_names_the_class(socket_path: Path) -> None:
    with pytest.raises(TypeError, match=r"IPCHandler.__init__\(\) got an unexpected keyword argument 'timout'"):
        IPCHandler(socket_path, BackendServiceStub, timout=1.0)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"SyncIPCHandler.__init__\(\) got an unexpected keyword argument 'lanes'"):
        SyncIPCHandler(socket_path, BackendServiceStub, lanes='grpc')  # type: ignore[call-arg]


@pytest.mark.parametrize('lane', ['grpc', 'ttrpc'])
def test_response_type_is_checked_before_sending_and_returned_typed(server: ServerProcess, lane: str) -> None:
    with SyncIPCHandler(server.socket_path, BackendServiceStub, lane=lane, timeout=10) as ipc:
        with pytest.raises(TypeError, match=r'GetStatus answers StatusResponse, not CommandResponse'):
            ipc.call_method('GetStatus', StatusRequest(), response_type=CommandResponse)
        status = ipc.call_method('GetStatus', StatusRequest(), response_type=StatusResponse)
        assert isinstance(status, StatusResponse) and status.status
