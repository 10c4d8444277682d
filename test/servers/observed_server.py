"""A real server process with an interceptor, for test_interceptors.py:
EchoService, ModuleService and StatusService, and a ``Gatekeeper`` that
refuses calls whose metadata carries ``x-deny`` and writes every call it
sees to a journal (one JSON line per started and per ended call, and what
StatusService's "context" and "wait-cancel" handlers see).

Usage: observed_server.py SOCKET_PATH JOURNAL [--no-metrics] [--broken-interceptor]
       [--refusing-interceptor]
"""

from __future__ import annotations

import argparse
import builtins
import json
import logging
import sys
import threading

from echo_server import EchoService
from google.protobuf import any_pb2
from google.rpc import error_details_pb2
import grpc
from status_service import StatusService

from vyra_base_ipc import CallRejected, IPCServer, ModuleService, ServerCall, ServerInterceptor, run


def denied_info() -> any_pb2.Any:
    """The ``google.rpc.ErrorInfo`` the Gatekeeper refuses ``x-deny: with-error-info`` with."""
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason='DENIED', domain='vyra.ipc.test', metadata={'by': 'gatekeeper'}))
    return detail


class Gatekeeper(ServerInterceptor):
    """Refuses calls with ``x-deny`` metadata; journals what it sees."""

    def __init__(self, journal: str) -> None:
        self._journal = open(journal, 'a', buffering=1, encoding='utf-8')
        self._lock = threading.Lock()

    def write(self, entry: dict) -> None:
        """Journal ``entry`` (from any thread)."""
        with self._lock:
            self._journal.write(json.dumps(entry) + '\n')

    def _call(self, call: ServerCall) -> dict:
        return {'method': call.method, 'service': call.service, 'lane': call.lane,
                'metadata': {key: value for key, value in call.metadata if isinstance(value, str)},
                'peer_pid': call.peer.pid if call.peer else None,
                'has_deadline': call.deadline is not None, 'thread': threading.current_thread().name}

    def call_started(self, call: ServerCall) -> None:
        self.write({'event': 'started', **self._call(call)})
        reason = dict(call.metadata).get('x-deny')
        if reason == 'with-error-info':  # with the ErrorInfo of gRPC's richer error model
            raise CallRejected(grpc.StatusCode.PERMISSION_DENIED, f'denied: {reason}',
                               status_details=[denied_info()])
        if reason == 'with-unpacked-error-info':  # (an ErrorInfo itself: CallRejected packs it)
            raise CallRejected(grpc.StatusCode.PERMISSION_DENIED, f'denied: {reason}',
                               status_details=[error_details_pb2.ErrorInfo(reason='DENIED')])
        if reason is not None:
            raise CallRejected(grpc.StatusCode.PERMISSION_DENIED, f'denied: {reason}')

    def call_ended(self, call: ServerCall, code: grpc.StatusCode, details: str, duration: float) -> None:
        self.write({'event': 'ended', **self._call(call), 'code': code.name, 'details': details,
                     'duration': duration})


class Broken(ServerInterceptor):
    """An interceptor with a bug: both hooks raise ``failure`` (an
    exception class: RuntimeError, SystemExit, KeyboardInterrupt)."""

    def __init__(self, failure: type[BaseException]) -> None:
        self.failure = failure

    def call_started(self, call: ServerCall) -> None:
        raise self.failure('bug in call_started')

    def call_ended(self, call: ServerCall, code: grpc.StatusCode, details: str, duration: float) -> None:
        raise self.failure('bug in call_ended')


class Refuser(ServerInterceptor):
    """Refuses calls with ``x-refuse`` metadata, before the Gatekeeper sees them."""

    def call_started(self, call: ServerCall) -> None:
        if 'x-refuse' in dict(call.metadata):
            raise CallRejected(grpc.StatusCode.PERMISSION_DENIED, 'refused first')


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('socket_path')
    parser.add_argument('journal')
    parser.add_argument('--no-metrics', dest='metrics', action='store_false')
    parser.add_argument('--broken-interceptor', choices=['RuntimeError', 'SystemExit', 'KeyboardInterrupt'])
    parser.add_argument('--refusing-interceptor', action='store_true')
    parser.add_argument('--maximum-concurrent-rpcs', type=int, default=None)
    options = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    gatekeeper = Gatekeeper(options.journal)
    interceptors: list[ServerInterceptor] = [gatekeeper]
    if options.broken_interceptor:
        interceptors.insert(0, Broken(getattr(builtins, options.broken_interceptor)))
    if options.refusing_interceptor:
        interceptors.insert(0, Refuser())
    module = ModuleService('observed')
    counted = []
    # A command with a side effect, read back with "count": proof that a
    # refused call never reached its handler.
    module.register_command('count', lambda parameters: str(len(counted.append(1) or counted)))
    server = IPCServer(options.socket_path, module_name='observed',
                       servicers=[EchoService(), module, StatusService(journal=gatekeeper.write)],
                       interceptors=interceptors, metrics=options.metrics, grace_period=1.0,
                       maximum_concurrent_rpcs=options.maximum_concurrent_rpcs)
    run(server.serve())


if __name__ == '__main__':
    main()
