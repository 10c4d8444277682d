"""The package's exceptions survive pickling and copying whole: a call made in
a process pool's worker fails in the parent with the same error, code,
details, method and status details (the default pickling remade an
``IPCError`` from its message alone, and failed)."""

from __future__ import annotations

from concurrent import futures
import copy
import multiprocessing
from pathlib import Path
import pickle
from typing import Any

from google.protobuf import any_pb2
import grpc
import pytest

from conftest import ServerProcess, StartServer
from servers.rich_status import RICH_MESSAGE, rich_status
from vyra_base_ipc import IPCRemoteError, SyncIPCHandler, exceptions

DETAIL = any_pb2.Any(type_url='type.googleapis.com/my_arm.JointFault', value=b'\x08\x03')
UNAVAILABLE, TIMEOUT = grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED

#: One of each exception the package raises, made as the package makes it.
SAMPLES: list[BaseException] = [
    exceptions.CallRejected(grpc.StatusCode.PERMISSION_DENIED, 'not you', status_details=[DETAIL]),
    exceptions.CommandError('no such joint', grpc.StatusCode.NOT_FOUND),
    exceptions.ForkedProcessError('forked'),
    exceptions.IPCError(grpc.StatusCode.INTERNAL, 'broken', method='/my_arm.Arm/Move', status_details=[DETAIL]),
    exceptions.IPCRemoteError(grpc.StatusCode.NOT_FOUND, 'no joint 7', method='/my_arm.Arm/Move'),
    exceptions.IPCTimeoutError(TIMEOUT, 'too slow'),
    exceptions.IPCUnavailableError(UNAVAILABLE, 'gone', status_details=[DETAIL]),
    exceptions.MessageTooLargeError(10, 5, method='/my_arm.Arm/Move', buffers=2),
    exceptions.ParameterError('grace_period', 'must be >= 0'),
    exceptions.ServiceCallTimeout(TIMEOUT, '/trigger did not answer'),
    exceptions.ServiceUnavailable(UNAVAILABLE, 'no /trigger'),
    exceptions.SharedMemoryError('no memfd'),
    exceptions.SocketInUseError('/tmp/arm_ipc.sock'),
    exceptions.TooLargeError('too large'),
    exceptions.UnsafeDirectoryError('/tmp/x is writable by others'),
    exceptions.UntrustedServerError(UNAVAILABLE, 'owned by uid 1001'),
]


def test_every_exception_of_the_package_has_a_sample() -> None:
    classes = {getattr(exceptions, name) for name in exceptions.__all__
               if isinstance(getattr(exceptions, name), type)}
    assert {type(sample) for sample in SAMPLES} == classes


@pytest.mark.parametrize('sample', SAMPLES, ids=lambda sample: type(sample).__name__)
@pytest.mark.parametrize('how', ['pickle', 'copy', 'deepcopy'])
def test_an_exception_pickled_or_copied_is_the_same_error(sample: BaseException, how: str) -> None:
    again = {'pickle': lambda error: pickle.loads(pickle.dumps(error)),
             'copy': copy.copy, 'deepcopy': copy.deepcopy}[how](sample)
    assert (type(again), str(again), again.args, vars(again)) == (type(sample), str(sample), sample.args,
                                                                  vars(sample))
    if isinstance(sample, OSError):
        assert (again.errno, again.strerror, again.filename) == (sample.errno, sample.strerror, sample.filename)


class JointError(exceptions.IPCRemoteError):
    """An error a user makes of the package's, with attributes in slots."""

    __slots__ = ('joint', '__limit')

    def __init__(self, joint: int, limit: float) -> None:
        super().__init__(grpc.StatusCode.OUT_OF_RANGE, f'joint {joint} beyond {limit}', status_details=[DETAIL])
        self.joint = joint
        self.__limit = limit

    @property
    def limit(self) -> float:
        return self.__limit


@pytest.mark.parametrize('how', ['pickle', 'copy', 'deepcopy'])
def test_a_users_subclass_with_slots_keeps_them(how: str) -> None:
    sample = JointError(3, 1.5)
    again = {'pickle': lambda error: pickle.loads(pickle.dumps(error)),
             'copy': copy.copy, 'deepcopy': copy.deepcopy}[how](sample)
    assert (type(again), str(again), vars(again)) == (JointError, str(sample), vars(sample))
    assert (again.joint, again.limit, again.status_details) == (3, 1.5, (DETAIL,))


@pytest.fixture(scope='module')
def server(start_module_server: StartServer, module_socket_dir: Path) -> ServerProcess:
    """One echo server (both lanes) for the tests of this module."""
    return start_module_server(module_socket_dir / 'e.sock').wait_serving(ttrpc=True)


def call_failing(socket_path: str, lane: str) -> Any:
    """(In a worker process) A call whose handler aborts with a rich status."""
    from vyra_ipc_test import echo_pb2, echo_pb2_grpc

    with SyncIPCHandler(socket_path, echo_pb2_grpc.StatusServiceStub, lane=lane, timeout=30) as ipc:
        return ipc.call_method('Misbehave', echo_pb2.MisbehaveRequest(how='abort-with-rich-status'))


@pytest.mark.parametrize('lane', ['grpc', 'ttrpc'])
def test_a_call_failing_in_a_process_pools_worker_fails_the_same_in_the_parent(
        server: ServerProcess, echo: Any, lane: str) -> None:
    context = multiprocessing.get_context('spawn')  # (a fork of a process that used gRPC is refused)
    with futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        with pytest.raises(IPCRemoteError) as raised:
            pool.submit(call_failing, str(server.socket_path), lane).result(timeout=60)
    error = raised.value
    assert (error.code, error.details, error.method) == (
        grpc.StatusCode.INVALID_ARGUMENT, RICH_MESSAGE, '/vyra.ipc.test.StatusService/Misbehave')
    assert list(error.status_details) == list(rich_status().details)
