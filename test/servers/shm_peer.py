"""Processes for test_shared_memory.py that must run apart from the test.

Usage: shm_peer.py SOCKET_PATH MODE [ARGS...]

``loop``
    A client that calls the fast lane (``SOCKET_PATH``) from four threads,
    forever, with messages above a 4 KiB threshold both ways and an explicit
    SharedBuffer, some calls held in the server by ``sleep_seconds``. Prints
    ``ready`` once every thread has finished a call; the test then kills it.
    No deadlines: a finished call with one is held by the server until it
    passes (a bug pinned by test_server_lets_go_of_a_calls_buffers_when_the_call_ends).
``no-memfd-client``
    Deletes ``os.memfd_create`` before importing vyra_base_ipc (as on a
    platform without it), then calls the fast lane with a message above the
    threshold and prints one JSON object: the warnings raised, whether
    shared memory was agreed, whether the answer was byte-exact, and what
    ``SharedBuffer.copy_from`` raised.
``serve-without-memfd [ECHO_SERVER_ARGS...]``
    Deletes ``os.memfd_create``, then runs echo_server.py on ``SOCKET_PATH``.
``faults SIZE [keep]`` (SOCKET_PATH: the gRPC lane's, as for SyncIPCHandler)
    A client that echoes SIZE bytes on the fast lane (shared memory above
    the default threshold), with glibc's malloc as it is or after
    ``keep_freed_memory()`` (``keep``): five calls, then ten more, whose page
    faults per call it prints, and whether the last answer was byte-exact,
    as one JSON object.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from typing import Any

THRESHOLD = 4096


def _echo_methods() -> tuple[Any, Any]:
    from vyra_ipc_test import echo_pb2, echo_pb2_grpc

    from vyra_base_ipc._methods import stub_methods

    return echo_pb2, stub_methods(echo_pb2_grpc.EchoServiceStub)


def loop(path: str) -> None:
    from vyra_base_ipc import SharedBuffer, SharedMemoryOptions
    from vyra_base_ipc.ttrpc import SyncConnection

    echo_pb2, methods = _echo_methods()
    connection = SyncConnection.connect(path, shared_memory=SharedMemoryOptions(threshold=THRESHOLD))
    buffer = SharedBuffer.copy_from(os.urandom(256 * 1024))
    payload = os.urandom(64 * 1024)
    started = threading.Barrier(5)

    def work(index: int) -> None:
        first = True
        while True:
            if index % 2:
                request = echo_pb2.InspectRequest(data=buffer.ref, payload=payload,
                                                  sleep_seconds=0.3 if index == 3 else 0.0)
                method = methods['Inspect' if index == 1 else 'InspectSync']
                reply = connection.call(method, request, buffers=[buffer])
                assert reply.size == buffer.size and reply.payload == payload
            else:
                reply = connection.call(methods['Echo'], echo_pb2.EchoRequest(payload=payload))
                assert reply.payload == payload
            if first:
                first = False
                started.wait()

    for index in range(4):
        threading.Thread(target=work, args=(index,), daemon=True).start()
    started.wait()
    print('ready', flush=True)
    threading.Event().wait()  # until killed


def no_memfd_client(path: str) -> None:
    import warnings

    del os.memfd_create
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        from vyra_base_ipc import SharedBuffer, SharedMemoryError, SharedMemoryOptions
        from vyra_base_ipc.ttrpc import SyncConnection

        echo_pb2, methods = _echo_methods()
        payload = os.urandom(64 * 1024)
        with SyncConnection.connect(path, shared_memory=SharedMemoryOptions(threshold=THRESHOLD)) as connection:
            reply = connection.call(methods['Echo'], echo_pb2.EchoRequest(payload=payload), timeout=30)
            agreed = connection.shared_memory
        try:
            SharedBuffer.copy_from(b'data').close()
            copy_error = ''
        except SharedMemoryError as error:
            copy_error = str(error)
    print(json.dumps({
        'warnings': [f'{warning.category.__name__}: {warning.message}' for warning in caught],
        'agreed': agreed is not None,
        'exact': reply.payload == payload,
        'copy_error': copy_error,
    }), flush=True)


def serve_without_memfd(path: str, args: list[str]) -> None:
    del os.memfd_create
    import echo_server

    sys.argv = ['echo_server.py', path, *args]
    echo_server.main()


def faults(path: str, size: int, keep: bool) -> None:
    import resource

    from vyra_ipc_test import echo_pb2_grpc

    from vyra_base_ipc import SyncIPCHandler, keep_freed_memory

    echo_pb2, _ = _echo_methods()
    if keep:
        keep_freed_memory()
    request = echo_pb2.EchoRequest(payload=os.urandom(size))
    with SyncIPCHandler(path, echo_pb2_grpc.EchoServiceStub, lane='ttrpc', timeout=60) as handler:
        for _ in range(5):  # (the heap grows to what a call needs)
            handler.call_method('Echo', request)
        exact = True
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(10):
            exact &= len(handler.call_method('Echo', request).payload) == size  # (read, as a caller would)
        per_call = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10
        exact &= handler.call_method('Echo', request).payload == request.payload
    print(json.dumps({'faults': per_call, 'exact': exact}), flush=True)


def main() -> None:
    path, mode, *args = sys.argv[1:]
    if mode == 'loop':
        loop(path)
    elif mode == 'no-memfd-client':
        no_memfd_client(path)
    elif mode == 'serve-without-memfd':
        serve_without_memfd(path, args)
    elif mode == 'faults':
        faults(path, int(args[0]), args[1:] == ['keep'])
    else:
        sys.exit(f'shm_peer.py: unknown mode {mode!r}')


if __name__ == '__main__':
    main()
