"""Mistakes a developer new to the package makes while building a module of
their own, each answered by an error that says what is wrong and what to do
(found by following the README from scratch)."""

from __future__ import annotations

import asyncio
from pathlib import Path
import uuid

import grpc
import pytest

from conftest import ServerProcess, StartServer
from ros_env import IPC_SERVER
from test_build_helper import build_package
from test_cli import EXECUTE, fails
from vyra_base_ipc import IPCHandler, IPCRemoteError, IPCServer, IPCUnavailableError, SyncIPCHandler
from vyra_base_ipc._node_run import EXIT_BAD_PARAMETER
from vyra_base_ipc.address import default_socket_path
from vyra_base_ipc.backend_service_pb2 import StatusRequest, StatusResponse
from vyra_base_ipc.backend_service_pb2_grpc import (
    BackendServiceServicer,
    BackendServiceStub,
    add_BackendServiceServicer_to_server,
)
from vyra_base_ipc.module_service_pb2 import CommandRequest, DataRequest, DataResponse
from vyra_base_ipc.module_service_pb2_grpc import ModuleServiceStub


@pytest.mark.parametrize('servicer', [BackendServiceServicer,
                                      (BackendServiceServicer, add_BackendServiceServicer_to_server)],
                         ids=['class', 'class-with-add-function'])
def test_a_servicer_class_given_instead_of_an_instance_is_named(socket_dir: Path, servicer: object) -> None:
    # It said: "type does not derive from a grpcio-generated *Servicer class; pass its
    # add_*Servicer_to_server function explicitly", of a class that does derive from one.
    with pytest.raises(TypeError) as refused:
        IPCServer(socket_path=socket_dir / 'class.sock', servicers=[servicer])
    assert str(refused.value) == ('servicers take instances, not the class BackendServiceServicer: '
                                  'pass BackendServiceServicer()')


#: A module of the developer's own with a class that is no servicer, whose
#: constructor leaves a mark (as a node's would start one).
NOT_A_SERVICER = """
from pathlib import Path

class GripperNode:
    def __init__(self):
        Path(__file__).with_name('created').write_text('the class was created')
"""


@pytest.mark.ros
@pytest.mark.parametrize(('spec', 'class_name'), [('gripper_node:GripperNode', 'GripperNode'),
                                                  ('vyra_base_ipc.backend_service_pb2:StatusRequest', 'StatusRequest')],
                         ids=['a-node-class', 'a-message-class'])
def test_a_servicers_parameter_naming_a_class_that_is_no_servicer_says_so_without_creating_it(
        start_process, socket_dir: Path, tmp_path: Path, ros_environ: dict[str, str],
        spec: str, class_name: str) -> None:
    # It created the class first: a node class hosting an IPC server in its __init__ then
    # hosted one per node it made (the -p applies to every node), on and on, and outlived SIGTERM.
    # A class it could create was refused with "pass its add_*Servicer_to_server function
    # explicitly", which a ROS parameter cannot do.
    (tmp_path / 'gripper_node.py').write_text(NOT_A_SERVICER)
    env = {**ros_environ, 'PYTHONPATH': f'{tmp_path}:{ros_environ.get("PYTHONPATH", "")}'}
    socket_path = socket_dir / 'gripper.sock'
    server = start_process([*IPC_SERVER, '--ros-args', '-p', 'module_name:=gripper',
                            '-p', f'socket_path:={socket_path}', '-p', f"servicers:=['{spec}']"], env)
    assert server.wait(timeout=60) == EXIT_BAD_PARAMETER, server.log()
    errors = [line for line in server.log().splitlines() if 'ERROR' in line]
    assert any(f"parameter 'servicers': '{spec}' is not a servicer: {class_name} derives from no "
               'grpcio-generated *Servicer class; name the class that implements your service' in line
               for line in errors), server.log()
    assert not (tmp_path / 'created').exists()
    assert not socket_path.exists()


def test_a_proto_declaring_the_package_of_ours_fails_the_build_naming_it(tmp_path: Path) -> None:
    # It built; the module's code and ours then could not be imported into one process
    # ("duplicate symbol 'vyra.ipc.StatusRequest'", raised by whichever came second).
    result = build_package(tmp_path, {'gadget/status.proto': 'package vyra.ipc;\n'
                                                             'message StatusRequest { int32 level = 1; }\n'})
    assert result.returncode == 1, result.stdout + result.stderr
    assert (f'error: gadget: cannot build these protos:\n  {tmp_path / "protos" / "gadget" / "status.proto"}: '
            "its package vyra.ipc is vyra_base_ipc's own (vyra_base_ipc/backend_service.proto, ") in result.stderr
    assert 'declare a package of your own module, such as `package gadget;`' in result.stderr
    assert not list((tmp_path / 'build').rglob('*_pb2*'))


def test_a_proto_in_a_package_below_ours_still_builds(tmp_path: Path) -> None:
    # As this package's own test and bench protos do (vyra.ipc.test, vyra.ipc.bench).
    result = build_package(tmp_path, {'gadget/extra.proto': 'package vyra.ipc.extra;\n'
                                                            'message StatusRequest { int32 level = 1; }\n'})
    assert result.returncode == 0, result.stdout + result.stderr
    assert [path.name for path in (tmp_path / 'build').rglob('extra_pb2.py')] == ['extra_pb2.py']


def test_a_yaml_request_without_a_space_after_a_colon_is_named_with_the_rule(server: ServerProcess) -> None:
    # YAML reads `command:ping` as the string 'command:ping'; it said only that the request must be an object.
    line = fails(2, 'call', str(server.socket_path), EXECUTE, 'command:ping')
    assert line == ('vyra-ipc: error: the request must be an object of vyra.ipc.CommandRequest fields, '
                    'not "command:ping" (YAML reads command:… as text: a key needs a space after its colon, '
                    'command: …)')


@pytest.mark.parametrize('lane', ['grpc', 'ttrpc'])
@pytest.mark.parametrize('handler', ['SyncIPCHandler', 'IPCHandler'])
def test_a_module_name_given_where_the_socket_path_goes_is_named_with_what_to_pass(
        start_server: StartServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, handler: str, lane: str
) -> None:
    # socket_path comes first: IPCHandler('gripper', Stub) looked for ./gripper and said only that it does not exist.
    module = f'newuser_{uuid.uuid4().hex[:12]}'
    start_server(default_socket_path(module), wait=False).wait_serving(ttrpc=True)
    monkeypatch.chdir(tmp_path)

    async def call_async() -> None:
        async with IPCHandler(module, ModuleServiceStub, lane=lane) as ipc:
            await ipc.call_method('ExecuteCommand', CommandRequest())

    with pytest.raises(IPCUnavailableError) as refused:
        if handler == 'SyncIPCHandler':
            with SyncIPCHandler(module, ModuleServiceStub, lane=lane) as ipc:
                ipc.call_method('ExecuteCommand', CommandRequest())
        else:
            asyncio.run(call_async())
    # (Raised by the with statement's connect(), before any method.)
    # (The fast lane names its own socket, beside the path given.)
    missing = tmp_path / (module if lane == 'grpc' else f'{module}.ttrpc.sock')
    assert str(refused.value) == (
        f"UNAVAILABLE: socket '{missing}' does not exist (is the IPC server running?); '{module}' is a "
        f"module name (its socket: '/tmp/{module}_ipc.sock'): pass module_name='{module}', not a socket path")


class _CallsItself(BackendServiceServicer):
    """A module whose handlers call the module's own server with SyncIPCHandler."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path

    def _status(self) -> str:
        with SyncIPCHandler(self.socket_path, BackendServiceStub, timeout=5) as itself:
            return str(itself.call_method('GetStatus', StatusRequest(), timeout=5).status)

    async def ProcessData(self, request: DataRequest, context: object) -> DataResponse:
        return DataResponse(result=self._status().encode())  # on the server's event loop: never answered

    def GetStatus(self, request: StatusRequest, context: object) -> StatusResponse:
        return StatusResponse(status='up')


@pytest.mark.parametrize('lane', ['grpc', 'ttrpc'])
def test_a_blocking_client_called_on_the_loop_of_the_server_it_calls_fails_at_once(
        socket_dir: Path, lane: str) -> None:
    # It waited for the loop it held until its deadline (5 s), and then said only that
    # nothing answered; the outer call timed out too.
    path = socket_dir / 'itself.sock'

    async def main() -> None:
        async with IPCServer(socket_path=path, servicers=[_CallsItself(path)]) as server:
            async with IPCHandler(path, BackendServiceStub, lane=lane, timeout=30) as client:
                with pytest.raises(IPCRemoteError) as failed:
                    await client.call_method('ProcessData', DataRequest())
                assert failed.value.code is grpc.StatusCode.UNKNOWN
                assert failed.value.details == (
                    f"Unexpected <class 'RuntimeError'>: SyncIPCHandler called on the event loop of the IPC "
                    f'server it calls ({path}): the call would wait for that loop, which waits for the call, '
                    'until its deadline. In an async def handler, await an IPCHandler call instead')
                # From a thread (a def handler, an executor) it is an ordinary call.
                status = await asyncio.get_running_loop().run_in_executor(None, _CallsItself(path)._status)
                assert status == 'up'
        assert server.socket_path == path
        # Once the server stopped, the loop no longer serves that socket: the call is tried, and fails as any.
        with pytest.raises(IPCUnavailableError):
            _CallsItself(path)._status()
    asyncio.run(main())


def test_a_blocking_client_naming_its_own_server_through_a_symlink_fails_at_once(socket_dir: Path) -> None:
    # The socket's directory named through a symbolic link (as /var/run for /run): it waited for its deadline.
    (socket_dir / 'real').mkdir()
    (socket_dir / 'link').symlink_to(socket_dir / 'real')
    path, linked = socket_dir / 'real' / 'itself.sock', socket_dir / 'link' / 'itself.sock'

    async def main() -> None:
        async with IPCServer(socket_path=path, servicers=[_CallsItself(linked)]):
            async with IPCHandler(path, BackendServiceStub, timeout=30) as client:
                with pytest.raises(IPCRemoteError) as failed:
                    await client.call_method('ProcessData', DataRequest())
                assert failed.value.details.startswith(
                    f"Unexpected <class 'RuntimeError'>: SyncIPCHandler called on the event loop of the IPC "
                    f'server it calls ({linked})')
    asyncio.run(main())
