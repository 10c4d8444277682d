"""Lane parity: one servicer, served on both lanes, behaves alike to its
callers on either lane and with either client.

A differential check. Each case calls a ParityService handler
(test/servers/parity_server.py, a real IPCServer process) four ways: on the
gRPC lane and on the fast lane, each with ``SyncIPCHandler`` and with
``IPCHandler``. What the caller observes (the messages it received, then the
exception's class, status code and details, the socket path in them made
alike) must be the same all four ways; where it is written down here, it
must also be what grpc.aio does (the reference for the gRPC lane), and
answer at once: no case may leave its caller waiting for the deadline.
"""

from __future__ import annotations

import json
from pathlib import Path
import re
from typing import Any, Callable, Iterator

import grpc
import pytest

from conftest import ServerProcess, StartServer, handler_of
from vyra_base_ipc import IPCError, IPCRemoteError, SharedMemoryOptions, SyncIPCHandler
from vyra_base_ipc.introspection_pb2 import StatsRequest
from vyra_base_ipc.ttrpc._messages import ENVELOPE_ALLOWANCE

#: The server's message size limit: small, so that messages at it are cheap.
LIMIT = 64 * 1024
#: Each call's timeout: far more than any case takes, so that one that waits
#: for it (a call nobody answers) stands out as IPCTimeoutError.
TIMEOUT = 10.0
WAYS = [(lane, client) for lane in ('grpc', 'ttrpc') for client in ('sync', 'async')]
UNARY = ['Unary', 'UnarySync', 'ClientStream', 'ClientStreamSync']
STREAMS = ['ServerStream', 'ServerStreamSync', 'Bidi', 'BidiSync']
ASYNC = {'Unary', 'ClientStream', 'ServerStream', 'Bidi'}
CODES = [code for code in grpc.StatusCode if code is not grpc.StatusCode.OK]
#: Messages a stream handler yields before it ends, however it ends (a def
#: stream handler that aborted after it yielded left its gRPC-lane caller
#: waiting, now and then, for the deadline while grpc.aio ran it:
#: grpc/grpc#28989; README: "def handlers on the gRPC lane").
ITEMS = 2


def _cases(methods: list[str], hows: Any) -> list[Any]:
    return [pytest.param(method, how, id=f'{method}-{how}') for method in methods for how in hows]


@pytest.fixture(scope='module')
def parity(start_module_server: StartServer, module_socket_dir: Path) -> Iterator[ServerProcess]:
    """The parity server on both lanes; at the end it must exit cleanly."""
    server = start_module_server(module_socket_dir / 'parity.sock', '--max-message-bytes', str(LIMIT),
                                 script='parity_server.py', wait=False).wait_serving(ttrpc=True)
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture(scope='module')
def roomy(start_module_server: StartServer, module_socket_dir: Path) -> Iterator[ServerProcess]:
    """The parity server with room for answers over a client's frame limit
    (4 * LIMIT), sending those of over 1 KiB in shared memory on the fast lane."""
    server = start_module_server(module_socket_dir / 'roomy.sock', '--max-message-bytes', str(4 * LIMIT),
                                 '--shared-memory-threshold', str(1024), script='parity_server.py',
                                 wait=False).wait_serving(ttrpc=True)
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture(scope='module')
def pb(test_protos_dir: Path) -> Any:
    from vyra_ipc_test import parity_pb2, parity_pb2_grpc

    class Parity:
        messages = parity_pb2
        Stub = parity_pb2_grpc.ParityServiceStub
    return Parity


Observed = tuple[Any, ...]


def observe(server: ServerProcess, stub: type, lane: str, client: str, method: str, request: Callable[[], Any],
            streaming: bool, options: dict[str, Any], call: dict[str, Any]) -> Observed:
    """What a caller on ``lane`` with a ``client`` handler observes of one
    call: the messages received (serialized), then the exception's class,
    code and details (or None); the lane's socket path in them is ``<socket>``."""
    received: list[bytes] = []
    options = {'lane': lane, 'timeout': TIMEOUT, **options}

    def failed(error: IPCError) -> Observed:
        details = error.details.replace(str(server.ttrpc_path), '<socket>').replace(
            str(server.socket_path), '<socket>')
        return tuple(received), type(error).__name__, error.code, details

    with handler_of(client, server.socket_path, stub, **options) as made, made as handler:
        try:
            if streaming:
                for reply in handler.stream_method(method, request(), **call):
                    received.append(reply.SerializeToString(deterministic=True))
            else:
                reply = handler.call_method(method, request(), **call)
                received.append(reply.SerializeToString(deterministic=True))
        except IPCError as error:
            return failed(error)
    return tuple(received), None


def compare(server: ServerProcess, pb: Any, method: str, *, options: dict[str, Any] | None = None,
            call: dict[str, Any] | None = None, request: Any = None, **fields: Any) -> Observed:
    """Call ``method`` with ``request`` (else a ParityRequest of ``fields``)
    all four ways; assert that each way observes the same; return that
    (with the received messages parsed)."""
    message = request if request is not None else pb.messages.ParityRequest(**fields)
    request_streaming = method.startswith(('ClientStream', 'Bidi'))
    streaming = method in STREAMS

    def requests() -> Any:  # (a request stream: the message, then an empty one)
        return iter([message, pb.messages.ParityRequest()]) if request_streaming else message
    seen = {way: observe(server, pb.Stub, *way, method, requests, streaming, options or {}, call or {})
            for way in WAYS}
    reference = seen[WAYS[0]]
    assert {way: what for way, what in seen.items() if what != reference} == {}, \
        f'{WAYS[0]} observed {reference}'
    return tuple(pb.messages.ParityReply.FromString(data) for data in reference[0]), *reference[1:]


def status(seen: Observed) -> tuple[Any, ...]:
    """The code and details of what a call ended with."""
    return seen[2:]


@pytest.mark.parametrize('code', CODES, ids=[code.name for code in CODES])
@pytest.mark.parametrize('method', ['Unary', 'UnarySync'])
def test_abort_with_every_code(parity: ServerProcess, pb: Any, method: str, code: grpc.StatusCode) -> None:
    seen = compare(parity, pb, method, how='abort', code=code.value[0], details=f'details of {code.name}')
    assert status(seen) == (code, f'details of {code.name}')


DETAILS = {'empty': '', 'unicode': 'ünïcödé ✓ 日本語 🤖', 'long': 'x' * 5000,
           'control characters': 'line\nbreak\ttab\r\x00', 'percent signs': '%41 100%% %zz'}


@pytest.mark.parametrize('details', DETAILS.values(), ids=DETAILS.keys())
@pytest.mark.parametrize('method, how', _cases(UNARY + STREAMS, ['abort']))
def test_abort_details_arrive_as_given(parity: ServerProcess, pb: Any, method: str, how: str, details: str) -> None:
    seen = compare(parity, pb, method, how=how, code=5, details=details, count=ITEMS)
    assert status(seen) == (grpc.StatusCode.NOT_FOUND, details)


#: What each way of ending gives, as grpc.aio gives it (None: an answer);
#: the request asks for code 9 (FAILED_PRECONDITION) and details 'why'.
HOWS: dict[str, Any] = {
    'reply': None,
    'abort': (grpc.StatusCode.FAILED_PRECONDITION, 'why'),
    'abort-status': (grpc.StatusCode.FAILED_PRECONDITION, 'why'),
    'set': (grpc.StatusCode.FAILED_PRECONDITION, 'why'),
    'set-none': (grpc.StatusCode.FAILED_PRECONDITION, 'why'),
    'set-code-only': (grpc.StatusCode.FAILED_PRECONDITION, ''),
    'set-details-only': None,
    # grpc.aio: an abort without details sends those set before.
    'details-then-abort': (grpc.StatusCode.FAILED_PRECONDITION, 'why'),
    'raise-value': (grpc.StatusCode.UNKNOWN, "Unexpected <class 'ValueError'>: why"),
    'raise-key': (grpc.StatusCode.UNKNOWN, "Unexpected <class 'KeyError'>: 'why'"),
    'raise-rpc-error': (grpc.StatusCode.UNKNOWN, "Unexpected <class '__main__.PlainRpcError'>: why"),
    # A downstream call's error: its code is not the call's (grpc.aio's too).
    'raise-relayed-rpc-error': (grpc.StatusCode.UNKNOWN, "Unexpected <class '__main__.RelayedRpcError'>: why"),
    'raise-timeout': (grpc.StatusCode.UNKNOWN, "Unexpected <class 'TimeoutError'>: why"),
    # An AbortError of its own, not from abort(): grpc.aio said
    # "Unexpected <class 'AssertionError'>: Abort error has been replaced!".
    'raise-abort-error': (grpc.StatusCode.UNKNOWN, "Unexpected <class 'grpc._cython.cygrpc.AbortError'>: why"),
    # grpc.aio sent nothing for these two: its caller waited for the deadline.
    'raise-unprintable': (grpc.StatusCode.UNKNOWN,
                          "Unexpected <class '__main__.Unprintable'>: <str() of the exception raised RuntimeError>"),
    'raise-cancelled': 'see test_a_handler_raising_cancelled_error_is_answered',
    # What is not the method's response is refused, naming it: protobuf
    # serializes a message of another type as any (grpc sends it, and its
    # caller reads the bytes as the response), and says of the rest only
    # that a descriptor does not apply.
    'return-wrong-type': 'vyra.ipc.test.ParityRequest',
    'return-str': 'a str',
    'return-none': 'None',
}



@pytest.mark.parametrize('method, how', _cases(UNARY + STREAMS, HOWS))
def test_each_way_of_ending_a_call_is_seen_alike(parity: ServerProcess, pb: Any, method: str, how: str) -> None:
    seen = compare(parity, pb, method, how=how, code=9, details='why', count=ITEMS)
    replies, expected = seen[0], HOWS[how]
    if method in STREAMS:  # the messages before the end came, whatever the end
        assert [reply.text for reply in replies[:ITEMS]] == ['item 0', 'item 1']
        if how == 'set-none':  # (a stream yields the None: it does not serialize)
            expected = 'UNKNOWN, in the words of protobuf, with the code set'
            assert seen[2] is grpc.StatusCode.FAILED_PRECONDITION and seen[3].startswith('Unexpected <class')
    if expected is None:
        assert seen[1] is None
    elif isinstance(expected, tuple):
        assert status(seen) == expected
    elif how.startswith('return-'):
        answered = f"{'yielded' if method in STREAMS else 'returned'} {expected}"
        hint = {'return-none': ' (a stream handler yields its responses)' if method in STREAMS else
                ' (did it forget to return its response?)'}.get(how, '')
        assert status(seen) == (grpc.StatusCode.UNKNOWN, "Unexpected <class 'TypeError'>: the handler of "
                                f'/vyra.ipc.test.ParityService/{method} {answered}, not a '
                                f'vyra.ipc.test.ParityReply{hint}')


@pytest.mark.parametrize('method, how', _cases(UNARY + STREAMS, ['raise-cancelled']))
def test_a_handler_raising_cancelled_error_is_answered(parity: ServerProcess, pb: Any, method: str,
                                                       how: str) -> None:
    # Its own CancelledError (an inner task's, say), not the call's end:
    # grpc.aio took it for that and answered nothing. An async def handler's
    # call is CANCELLED, as one cancelled in the server; a def handler's
    # UNKNOWN, as for any exception.
    seen = compare(parity, pb, method, how=how, details='why', count=ITEMS)
    assert status(seen) == ((grpc.StatusCode.CANCELLED, 'Cancelled') if method in ASYNC else
                            (grpc.StatusCode.UNKNOWN, "Unexpected <class 'asyncio.exceptions.CancelledError'>: why"))


#: What a def handler may raise that is no Exception, or none an asyncio future
#: takes: the gRPC lane's caller waited for its deadline (grpc.aio answers no
#: BaseException but the exits; a StopIteration left the call's future pending).
OTHER_RAISES = {'raise-stop-iteration': 'StopIteration', 'raise-generator-exit': 'GeneratorExit',
                'raise-base-exception': 'BaseException', 'raise-system-exit': 'SystemExit',
                'raise-keyboard-interrupt': 'KeyboardInterrupt'}


@pytest.mark.parametrize('method, how', _cases(['UnarySync', 'ClientStreamSync', 'ServerStreamSync', 'BidiSync'],
                                               OTHER_RAISES))
def test_whatever_a_def_handler_raises_is_answered_as_an_exception(parity: ServerProcess, pb: Any, method: str,
                                                                   how: str) -> None:
    seen = compare(parity, pb, method, how=how, details='why', count=2)
    if method in STREAMS:  # (after the messages it yielded)
        assert [reply.text for reply in seen[0]] == ['item 0', 'item 1']
    words = f"<class '{OTHER_RAISES[how]}'>: why"
    if how == 'raise-stop-iteration' and method in STREAMS:  # a generator's is a RuntimeError
        words = "<class 'RuntimeError'>: generator raised StopIteration"
    assert status(seen) == (grpc.StatusCode.UNKNOWN, f'Unexpected {words}')


@pytest.mark.parametrize('method', ['Unary', 'UnarySync', 'ServerStream', 'ServerStreamSync'])
def test_what_a_handler_sees_of_its_call(parity: ServerProcess, pb: Any, method: str) -> None:
    seen = compare(parity, pb, method, how='context', call={'metadata': [('x-a', 'b'), ('x-b-bin', b'\0\1')]})
    assert json.loads(seen[0][-1].text) == {
        'time_remaining': True, 'peer': 'unix:', 'metadata': [['x-a', 'b'], ['x-b-bin', '0001']],
        'code': None, 'details': '' if method in ASYNC else None, 'cancelled': False, 'done': False}


def test_a_request_with_unknown_fields_reaches_the_handler_with_them(parity: ServerProcess, pb: Any) -> None:
    plus = pb.messages.ParityRequestPlus(how='echo', extra='from a newer .proto')
    request = pb.messages.ParityRequest.FromString(plus.SerializeToString())
    for method in ('Unary', 'UnarySync'):
        seen = compare(parity, pb, method, request=request)
        assert pb.messages.ParityRequestPlus.FromString(seen[0][0].payload) == plus


def _reply_size(pb: Any, payload: int, index: int) -> int:
    return pb.messages.ParityReply(text='done', payload=b'p' * payload, index=index).ByteSize()


@pytest.mark.parametrize('method', UNARY + STREAMS)
def test_an_answer_at_the_size_limit_goes_and_one_byte_over_is_resource_exhausted(
        parity: ServerProcess, pb: Any, method: str) -> None:
    index = 2 if method.startswith('Bidi') else 0  # (a Bidi handler's last reply counts the requests)
    at_limit = next(size for size in range(LIMIT - 16, LIMIT) if _reply_size(pb, size, index) == LIMIT)
    roomy = {'max_message_bytes': 4 * LIMIT}  # clients that would take more: the server's limit counts
    seen = compare(parity, pb, method, options=roomy, how='reply', size=at_limit)
    assert seen[0][-1].ByteSize() == LIMIT
    seen = compare(parity, pb, method, options=roomy, how='reply', size=at_limit + 1)
    assert status(seen) == (grpc.StatusCode.RESOURCE_EXHAUSTED, sent_too_large(method, LIMIT + 1))


def sent_too_large(method: str, size: int) -> str:
    """What a client is told of an answer of ``method`` of ``size`` bytes,
    over the server's LIMIT: grpc core's words, then what they mean."""
    return (f'SERVER: Sent message larger than max ({size} vs. {LIMIT}): an answer of '
            f"/vyra.ipc.test.ParityService/{method} over the server's max_message_bytes")


#: The answers over the server's limit of the test below: (method, request fields).
OVER_LIMIT = [*[(method, {}) for method in UNARY + STREAMS],
              *[(method, {'how': 'write', 'count': 1}) for method in ('ServerStream', 'ServerStreamSync')]]


@pytest.mark.parametrize('metrics', [True, False], ids=['metrics', 'no-metrics'])
def test_answers_over_the_servers_limit_are_logged_once_a_method_then_counted(
        start_server: StartServer, socket_dir: Path, pb: Any, metrics: bool) -> None:
    """20 calls each way (both lanes) of every shape of handler (and two
    that write with ``context.write()``) answering 1 byte over the server's
    max_message_bytes: each caller gets RESOURCE_EXHAUSTED naming the method,
    the size and the limit; the server's log one line a method naming them,
    then at most a summary telling the others. (The gRPC lane logged only
    grpc's ERROR "ExecuteBatchError raised in core" with its traceback,
    which does not say why; the fast lane nothing.) With metrics or without
    (the gRPC lane's handlers were wrapped only to observe calls)."""
    server = start_server(socket_dir / 'over.sock', '--max-message-bytes', str(LIMIT), *([] if metrics else
                          ['--no-metrics']), script='parity_server.py', wait=False).wait_serving(ttrpc=True)
    calls: dict[str, int] = {}
    for method, fields in OVER_LIMIT:
        index = 2 if method.startswith('Bidi') else 0  # (a Bidi handler's last reply counts the requests)
        payload = next(size for size in range(LIMIT - 16, LIMIT + 1) if _reply_size(pb, size, index) == LIMIT + 1)
        if fields:  # (the written item: 'item 0', index 0)
            payload = next(size for size in range(LIMIT - 16, LIMIT + 1) if pb.messages.ParityReply(
                text='item 0', payload=b'p' * size).ByteSize() == LIMIT + 1)
        request = pb.messages.ParityRequest(**{'how': 'reply', **fields}, size=payload)
        for lane in ('grpc', 'ttrpc'):
            with SyncIPCHandler(server.socket_path, pb.Stub, lane=lane, max_message_bytes=4 * LIMIT) as client:
                for _ in range(20):
                    calls[method] = calls.get(method, 0) + 1
                    with pytest.raises(IPCRemoteError) as raised:
                        if method in STREAMS:
                            requests = iter([request, pb.messages.ParityRequest()]) \
                                if method.startswith('Bidi') else request
                            list(client.stream_method(method, requests))
                        else:
                            client.call_method(method, iter([request]) if method.startswith('Client') else request)
                    assert (raised.value.code, raised.value.details) == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                                                         sent_too_large(method, LIMIT + 1))
    assert server.stop() == 0
    log = server.log().splitlines()
    for method, count in calls.items():
        logged = [line for line in log if f'/vyra.ipc.test.ParityService/{method}: an answer of {LIMIT + 1} '
                  f'bytes is over max_message_bytes ({LIMIT}); the call ends RESOURCE_EXHAUSTED' in line]
        assert len(logged) <= 2 and told(logged) == count, (method, logged[:5])
    assert not [line for line in log if 'ExecuteBatchError' in line or 'Traceback' in line], log


def told(lines: list[str]) -> int:
    """How many records ``lines`` stand for: each, and the ``[N more like
    this in the last S s]`` it says were held back."""
    return sum(1 + int(match.group(1)) if (match := re.search(r'\[(\d+) more like this in the last', line))
               else 1 for line in lines)


#: The server's limit of the test below: below every answer of introspection
#: and reflection, above health's (2 bytes).
TOOLS_LIMIT = 64


def test_the_tools_answers_over_the_servers_limit_are_resource_exhausted_alike(
        start_server: StartServer, socket_dir: Path, pb: Any) -> None:
    """The tools every server serves beside the module's services answering
    over its max_message_bytes (introspection on both lanes, reflection on
    the gRPC lane, where it is served) end RESOURCE_EXHAUSTED naming the
    method and the sizes, as a module's own answers do, and the server's
    log says so, without grpc's ERROR "ExecuteBatchError raised in core";
    health's answers under the limit go, and the server serves on. Before,
    the gRPC lane left them to grpc core: "SERVER: Sent message larger than
    max (N vs. M)" alone, and that ERROR with its traceback in the log."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    from vyra_base_ipc.introspection_pb2 import ServerInfoRequest
    from vyra_base_ipc.introspection_pb2_grpc import IntrospectionStub

    server = start_server(socket_dir / 'tools.sock', '--max-message-bytes', str(TOOLS_LIMIT),
                          script='parity_server.py', wait=False).wait_serving(ttrpc=True)

    def sent_too_large_of(path: str, details: str) -> int:
        """The size ``details`` says an answer of ``path`` had, over the limit."""
        match = re.fullmatch(rf'SERVER: Sent message larger than max \((\d+) vs\. {TOOLS_LIMIT}\): an answer of '
                             rf"{re.escape(path)} over the server's max_message_bytes", details)
        assert match is not None, details
        return int(match.group(1))

    sizes = set()
    for lane in ('grpc', 'ttrpc'):
        with SyncIPCHandler(server.socket_path, IntrospectionStub, lane=lane) as introspection:
            for method, request in (('GetServerInfo', ServerInfoRequest()), ('GetStats', StatsRequest())):
                with pytest.raises(IPCRemoteError) as raised:
                    introspection.call_method(method, request)
                assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED, (lane, method, raised.value)
                size = sent_too_large_of(f'/vyra.ipc.Introspection/{method}', raised.value.details)
                assert size > TOOLS_LIMIT
                if method == 'GetServerInfo':
                    sizes.add(size)
    assert len(sizes) == 1, sizes  # (the same answer on both lanes)
    with grpc.insecure_channel(f'unix:{server.socket_path}') as channel:
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo
        with pytest.raises(grpc.RpcError) as failed:
            list(reflect(iter([reflection_pb2.ServerReflectionRequest(
                file_containing_symbol='grpc.health.v1.Health')]), timeout=10))
        assert failed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, failed.value
        sent_too_large_of('/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo', failed.value.details())
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
    assert server.stop() == 0
    log = server.log().splitlines()
    for path in ('/vyra.ipc.Introspection/GetServerInfo', '/vyra.ipc.Introspection/GetStats',
                 '/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo'):
        assert [line for line in log if re.search(rf'{re.escape(path)}: an answer of \d+ bytes is over '
                                                  rf'max_message_bytes \({TOOLS_LIMIT}\)', line)], (path, log)
    assert not [line for line in log if 'ExecuteBatchError' in line or 'Traceback' in line], log


#: How a request travels to the server on the fast lane (the gRPC lane
#: carries each inline): the client's shared_memory.
REQUEST_ROUTES = {'inline': None, 'shared memory': SharedMemoryOptions(threshold=1024)}


def _request_of(pb: Any, size: int) -> Any:
    """A request of ``size`` bytes (``size`` of at least 20)."""
    return next(request for payload in range(size - 16, size)
                if (request := pb.messages.ParityRequest(how='reply', payload=b'x' * payload)).ByteSize() == size)


@pytest.mark.parametrize('method', UNARY + STREAMS)
@pytest.mark.parametrize('route', REQUEST_ROUTES)
def test_a_request_at_the_size_limit_goes_and_one_byte_over_is_resource_exhausted(
        parity: ServerProcess, pb: Any, route: str, method: str) -> None:
    roomy = {'max_message_bytes': 4 * LIMIT, 'shared_memory': REQUEST_ROUTES[route]}
    seen = compare(parity, pb, method, options=roomy, request=_request_of(pb, LIMIT))
    assert seen[1] is None
    seen = compare(parity, pb, method, options=roomy, request=_request_of(pb, LIMIT + 1))
    assert status(seen) == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f'SERVER: Received message larger than max ({LIMIT + 1} vs. {LIMIT})')


@pytest.mark.parametrize('method', UNARY + STREAMS)
def test_a_request_over_the_servers_frame_limit_is_resource_exhausted_alike(
        parity: ServerProcess, pb: Any, method: str) -> None:
    # Its frame is skipped unread on the fast lane; a streamed message's frame
    # is the message, and a request's frame (Unary's, ServerStream's) tells its
    # message's size in its first bytes, which the server reads for a client
    # that agreed a Hello. (That one was refused in containerd's words,
    # "message length ... exceed maximum ...", which a plain ttrpc peer still gets.)
    size = LIMIT + ENVELOPE_ALLOWANCE + 100
    seen = compare(parity, pb, method, options={'max_message_bytes': 8 * LIMIT, 'shared_memory': None},
                   request=_request_of(pb, size))
    assert status(seen) == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f'SERVER: Received message larger than max ({size} vs. {LIMIT})')


#: The client's max_message_bytes in the cases of answers over it.
CLIENT_LIMIT = 8 * 1024
#: How an answer over the client's limit reaches it on the fast lane (the
#: gRPC lane carries each inline): (the client's shared_memory, payload bytes
#: past CLIENT_LIMIT). A frame over the client's frame limit is skipped unread.
ANSWER_ROUTES = {'inline': (None, 100), 'frame over the limit': (None, ENVELOPE_ALLOWANCE + 100),
                 'shared memory': (SharedMemoryOptions(), 100)}


@pytest.mark.parametrize('method', UNARY + STREAMS)
@pytest.mark.parametrize('route', ANSWER_ROUTES)
def test_an_answer_over_the_clients_limit_is_resource_exhausted_in_grpcs_words(
        roomy: ServerProcess, pb: Any, route: str, method: str) -> None:
    shared_memory, past = ANSWER_ROUTES[route]
    index = 2 if method.startswith('Bidi') else 0  # (a Bidi handler's last reply counts the requests)
    options = {'max_message_bytes': CLIENT_LIMIT, 'shared_memory': shared_memory}
    seen = compare(roomy, pb, method, options=options, how='reply', size=CLIENT_LIMIT + past)
    size = _reply_size(pb, CLIENT_LIMIT + past, index)
    # grpc core's words, as its channel gives them (the stream it removed).
    assert status(seen) == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f'Stream removed (CLIENT: Received message larger than max ({size} vs. {CLIENT_LIMIT}))')
    assert [reply.text for reply in seen[0]] == (['item 0', 'item 1'] if index else [])


@pytest.mark.parametrize('method', UNARY + STREAMS)
def test_a_call_whose_deadline_has_passed_when_made_times_out(parity: ServerProcess, pb: Any, method: str) -> None:
    seen = compare(parity, pb, method, call={'timeout': 1e-9}, how='reply')
    assert seen[1:3] == ('IPCTimeoutError', grpc.StatusCode.DEADLINE_EXCEEDED)


@pytest.mark.parametrize('code', [42, -1])
@pytest.mark.parametrize('how', ['abort', 'set', 'set-none', 'set-code-only'])
@pytest.mark.parametrize('method', ['Unary', 'UnarySync'])
def test_a_code_no_status_has_is_unknown(parity: ServerProcess, pb: Any, method: str, how: str, code: int) -> None:
    seen = compare(parity, pb, method, how=how, code=code, details='odd')
    assert seen[2] is grpc.StatusCode.UNKNOWN


@pytest.mark.parametrize('method', ['UnarySync', 'ServerStreamSync', 'Unary', 'ServerStream'])
def test_abort_with_ok_is_unknown(parity: ServerProcess, pb: Any, method: str) -> None:
    # As grpc's own synchronous server answers it; grpc.aio sent nothing.
    seen = compare(parity, pb, method, call={'timeout': 2.0}, how='abort', code=0, details='not ok')
    assert status(seen) == (grpc.StatusCode.UNKNOWN, 'not ok')


def test_an_async_stream_written_with_context_write(parity: ServerProcess, pb: Any) -> None:
    seen = compare(parity, pb, 'ServerStream', how='write', count=2)
    assert [reply.text for reply in seen[0]] == ['item 0', 'item 1'] and seen[1] is None


#: The methods of grpc's contexts that the fast lane's have and grpc.aio's
#: have not (README: "Two lanes"): a servicer for both lanes leaves them be.
FAST_LANE_ONLY = {'Unary': {'add_callback', 'is_active'}, 'UnarySync': set()}
#: ...and what grpc.aio's async context has that the fast lane's has not.
GRPC_ONLY = {'Unary': {'read'}, 'UnarySync': set()}


@pytest.mark.parametrize('method', ['Unary', 'UnarySync'])
def test_the_contexts_differ_only_as_documented(parity: ServerProcess, pb: Any, method: str) -> None:
    api = {}
    for lane in ('grpc', 'ttrpc'):
        seen = observe(parity, pb.Stub, lane, 'sync', method, lambda: pb.messages.ParityRequest(how='context-api'),
                       False, {}, {})
        api[lane] = set(pb.messages.ParityReply.FromString(seen[0][0]).text.split())
    assert (api['ttrpc'] - api['grpc'], api['grpc'] - api['ttrpc']) == (FAST_LANE_ONLY[method], GRPC_ONLY[method])
