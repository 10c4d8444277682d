"""A real server process with an interceptor, for test_interceptors.py:
EchoService, ModuleService and QuirkService, and a ``Gatekeeper`` that refuses calls whose
metadata carries ``x-deny`` and writes every call it sees to a journal (one
JSON line per started and per ended call).

Usage: observed_server.py SOCKET_PATH JOURNAL [--no-metrics] [--broken-interceptor]
"""

from __future__ import annotations

import argparse
import builtins
import json
import logging
import sys
import threading
import time

from echo_server import EchoService
import grpc
from vyra_ipc_test import quirk_pb2, quirk_pb2_grpc

from vyra_base_ipc import CallRejected, IPCServer, ModuleService, ServerCall, ServerInterceptor, run


class Gatekeeper(ServerInterceptor):
    """Refuses calls with ``x-deny`` metadata; journals what it sees."""

    def __init__(self, journal: str) -> None:
        self._journal = open(journal, 'a', buffering=1, encoding='utf-8')
        self._lock = threading.Lock()

    def _write(self, entry: dict) -> None:
        with self._lock:
            self._journal.write(json.dumps(entry) + '\n')

    def _call(self, call: ServerCall) -> dict:
        return {'method': call.method, 'service': call.service, 'lane': call.lane,
                'metadata': {key: value for key, value in call.metadata if isinstance(value, str)},
                'peer_pid': call.peer.pid if call.peer else None,
                'has_deadline': call.deadline is not None}

    def call_started(self, call: ServerCall) -> None:
        self._write({'event': 'started', **self._call(call)})
        reason = dict(call.metadata).get('x-deny')
        if reason is not None:
            raise CallRejected(grpc.StatusCode.PERMISSION_DENIED, f'denied: {reason}')

    def call_ended(self, call: ServerCall, code: grpc.StatusCode, details: str, duration: float) -> None:
        self._write({'event': 'ended', **self._call(call), 'code': code.name, 'details': details,
                     'duration': duration})


def _seen(context) -> dict:
    return {'is_active': context.is_active(), 'cancelled': context.cancelled(), 'done': context.done()}


class Quirks(quirk_pb2_grpc.QuirkServiceServicer):
    """Handlers that end their calls in unusual ways (see quirk.proto)."""

    def __init__(self, gatekeeper: Gatekeeper) -> None:
        self._gatekeeper = gatekeeper

    async def Quirk(self, request, context):
        if request.how == 'abort-int':
            await context.abort(5, 'aborted with 5')
        return self._quirk(request, context)

    def QuirkSync(self, request, context):
        if request.how == 'abort-int':
            context.abort(5, 'aborted with 5')
        if request.how == 'wait-cancel':  # as a def handler that works on until its call ends would
            ending = time.monotonic() + 60
            while context.is_active() and time.monotonic() < ending:
                time.sleep(0.01)
            self._gatekeeper._write({'event': 'quirk', 'tag': request.tag, **_seen(context)})
            return quirk_pb2.QuirkReply(text='too late')
        if request.how == 'context':
            context.add_done_callback(lambda _: self._gatekeeper._write(
                {'event': 'quirk', 'tag': request.tag, 'done_callback': True}))
        return self._quirk(request, context)

    async def QuirkStream(self, request, context):
        yield quirk_pb2.QuirkReply(text='first')
        if request.how == 'abort-int':
            await context.abort(5, 'aborted with 5')
        if request.how == 'catch-abort':
            try:
                await context.abort(grpc.StatusCode.NOT_FOUND, 'aborted, then went on')
            except grpc.aio.AbortError:
                pass
            yield quirk_pb2.QuirkReply(text='after the abort')
        yield self._quirk(request, context)

    @staticmethod
    def _quirk(request, context):
        if request.how == 'set-code-raise':
            context.set_code(grpc.StatusCode.NOT_FOUND)
            raise ValueError('raised after set_code')
        if request.how == 'return-none':
            return None
        return quirk_pb2.QuirkReply(text=json.dumps(_seen(context)))


class Broken(ServerInterceptor):
    """An interceptor with a bug: both hooks raise ``failure`` (an
    exception class: RuntimeError, SystemExit, KeyboardInterrupt)."""

    def __init__(self, failure: type[BaseException]) -> None:
        self.failure = failure

    def call_started(self, call: ServerCall) -> None:
        raise self.failure('bug in call_started')

    def call_ended(self, call: ServerCall, code: grpc.StatusCode, details: str, duration: float) -> None:
        raise self.failure('bug in call_ended')


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('socket_path')
    parser.add_argument('journal')
    parser.add_argument('--no-metrics', dest='metrics', action='store_false')
    parser.add_argument('--broken-interceptor', choices=['RuntimeError', 'SystemExit', 'KeyboardInterrupt'])
    options = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    gatekeeper = Gatekeeper(options.journal)
    interceptors: list[ServerInterceptor] = [gatekeeper]
    if options.broken_interceptor:
        interceptors.insert(0, Broken(getattr(builtins, options.broken_interceptor)))
    module = ModuleService('observed')
    counted = []
    # A command with a side effect, read back with "count": proof that a
    # refused call never reached its handler.
    module.register_command('count', lambda parameters: str(len(counted.append(1) or counted)))
    server = IPCServer(options.socket_path, module_name='observed',
                       servicers=[EchoService(), module, Quirks(gatekeeper)],
                       interceptors=interceptors, metrics=options.metrics, grace_period=1.0)
    run(server.serve())


if __name__ == '__main__':
    main()
