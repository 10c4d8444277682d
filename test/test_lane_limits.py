"""A request too large for ``max_message_bytes`` fails before sending with
MessageTooLargeError (an IPCError, not a remote error) naming the size, the
limit and what to change, on both lanes alike: an explicit SharedBuffer
counts as the bytes the gRPC lane has to carry inline, so a call neither
works on the fast lane and fails after a fallback to gRPC, nor the other way
round. Raised on both ends, the limit lets the buffer travel on both lanes
(as shared memory on the fast lane). Real servers in real processes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
import grpc
import pytest

from conftest import LANES, ServerProcess, StartServer, call_through
from vyra_base_ipc import (
    IPCRemoteError,
    MessageTooLargeError,
    SharedBuffer,
    SharedBufferRef,
    SyncIPCHandler,
    _inline_buffers,
)
from vyra_base_ipc._inline_buffers import inline_buffers, inline_size
from vyra_base_ipc.introspection_pb2 import StatsRequest
from vyra_base_ipc.introspection_pb2_grpc import IntrospectionStub

MiB = 1 << 20
FRAME = 24 * MiB  # a camera frame above the default max_message_bytes of 16 MiB
#: The server's max_message_bytes: above the frame, so that only the
#: client's limit can refuse it.
SERVER_LIMIT = 32 * MiB
KINDS = ('sync', 'async')


@pytest.fixture(scope='module')
def big_server(start_module_server: StartServer, module_socket_dir: Path) -> ServerProcess:
    """One echo server (both lanes) that accepts messages up to 32 MiB."""
    return start_module_server(module_socket_dir / 'e.sock', '--max-message-bytes',
                               str(SERVER_LIMIT)).wait_serving(ttrpc=True)


def inspect_calls(server: ServerProcess) -> int:
    """How many calls of EchoService/Inspect the server has seen, on either lane."""
    with SyncIPCHandler(server.socket_path, IntrospectionStub, lane='grpc') as handler:
        stats = handler.call_method('GetStats', StatsRequest())
    return sum(entry.calls + entry.in_flight for entry in stats.methods
               if entry.method == '/vyra.ipc.test.EchoService/Inspect')


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('lane', LANES)
def test_explicit_24_mib_buffer_over_the_default_limit_is_refused_before_sending_on_both_lanes(
        big_server: ServerProcess, echo: Any, lane: str, kind: str) -> None:
    before = inspect_calls(big_server)
    with SharedBuffer.copy_from(os.urandom(FRAME)) as buffer:
        error = call_through(kind, big_server.socket_path, echo.Stub, 'Inspect',
                             echo.pb.InspectRequest(data=buffer.ref), buffers=[buffer], lane=lane)
    assert isinstance(error, MessageTooLargeError) and not isinstance(error, IPCRemoteError), repr(error)
    assert error.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.method == '/vyra.ipc.test.EchoService/Inspect'
    assert (error.size, error.limit, error.buffers) == (FRAME + 24, 16 * MiB, 1)
    for words in (str(FRAME + 24), f'over max_message_bytes ({16 * MiB})', 'nothing was sent', 'SharedBuffer',
                  'raise max_message_bytes on the client and the server'):
        assert words in error.details, error.details
    assert inspect_calls(big_server) == before  # the server never saw it


def test_raising_max_message_bytes_lets_the_24_mib_buffer_travel_on_both_lanes(
        big_server: ServerProcess, echo: Any) -> None:
    data = os.urandom(FRAME)
    with SharedBuffer.copy_from(data) as buffer:
        request = echo.pb.InspectRequest(data=buffer.ref)
        replies = {lane: call_through('sync', big_server.socket_path, echo.Stub, 'Inspect', request,
                                      buffers=[buffer], lane=lane, max_message_bytes=SERVER_LIMIT, timeout=60)
                   for lane in LANES}
    for lane, reply in replies.items():
        assert (reply.size, reply.sha256) == (FRAME, hashlib.sha256(data).digest()), (lane, reply)
    assert (replies['grpc'].inline, replies['ttrpc'].inline) == (True, False)  # copied once, zero-copy


@pytest.mark.parametrize('lane', LANES)
def test_the_limit_counts_a_buffer_exactly_as_the_grpc_lane_carries_it(
        big_server: ServerProcess, echo: Any, lane: str) -> None:
    limit = 1 * MiB
    # What the request adds to its buffer's bytes (the same for any size near the limit).
    with SharedBuffer.copy_from(bytes(limit - 100)) as probe:
        overhead = inline_size(echo.pb.InspectRequest(data=probe.ref), [probe]) - probe.size
    at_limit = limit - overhead
    for size, fits in ((at_limit, True), (at_limit + 1, False)):
        with SharedBuffer.copy_from(os.urandom(size)) as buffer:
            request = echo.pb.InspectRequest(data=buffer.ref)
            assert inline_size(request, [buffer]) == limit + (0 if fits else 1)
            answer = call_through('sync', big_server.socket_path, echo.Stub, 'Inspect', request,
                                  buffers=[buffer], lane=lane, max_message_bytes=limit)
        if fits:
            assert answer.size == size, answer
        else:
            assert isinstance(answer, MessageTooLargeError) and answer.size == limit + 1, repr(answer)


@pytest.mark.parametrize('lane', LANES)
def test_a_plain_request_over_the_client_limit_raises_the_same_error_on_both_lanes(
        big_server: ServerProcess, echo: Any, lane: str) -> None:
    error = call_through('sync', big_server.socket_path, echo.Stub, 'Echo',
                         echo.pb.EchoRequest(payload=b'x' * MiB), lane=lane, max_message_bytes=MiB)
    assert isinstance(error, MessageTooLargeError), repr(error)
    assert (error.size, error.limit, error.buffers) == (MiB + 4, MiB, 0)  # tag, 3-byte length, bytes
    assert 'raise max_message_bytes on the client and the server' in error.details
    assert error.method == '/vyra.ipc.test.EchoService/Echo'


def _buffer_holder_class(pool: Any = None) -> type:
    """A message with SharedBufferRefs at several depths: nested, repeated,
    in a map; in ``pool`` (default: protobuf's default pool)."""
    if pool is None:
        pool = descriptor_pool.Default()
    else:
        pool.AddSerializedFile(SharedBufferRef.DESCRIPTOR.file.serialized_pb)
    name = 'vyra_ipc_test_error_texts.Holder'
    try:
        return message_factory.GetMessageClass(pool.FindMessageTypeByName(name))
    except KeyError:
        pass
    ref = '.' + SharedBufferRef.DESCRIPTOR.full_name
    file = descriptor_pb2.FileDescriptorProto(
        name='vyra_ipc_test_error_texts/holder.proto', package='vyra_ipc_test_error_texts', syntax='proto3',
        dependency=[SharedBufferRef.DESCRIPTOR.file.name])
    message = file.message_type.add(name='Holder')
    optional, repeated = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL, \
        descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
    of_message = descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE
    message.field.add(name='one', number=1, label=optional, type=of_message, type_name=ref)
    message.field.add(name='many', number=2, label=repeated, type=of_message, type_name=ref)
    message.field.add(name='inner', number=3, label=optional, type=of_message,
                      type_name='.vyra_ipc_test_error_texts.Holder')
    entry = message.nested_type.add(name='ByNameEntry')
    entry.options.map_entry = True
    entry.field.add(name='key', number=1, label=optional, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING)
    entry.field.add(name='value', number=2, label=optional, type=of_message, type_name=ref)
    message.field.add(name='by_name', number=4, label=repeated, type=of_message,
                      type_name='.vyra_ipc_test_error_texts.Holder.ByNameEntry')
    message.field.add(name='note', number=5, label=optional, type=descriptor_pb2.FieldDescriptorProto.TYPE_BYTES)
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(name))


def test_field_shapes_are_remembered_for_a_bounded_number_of_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    # Sizing a request with buffers remembers what each field holds, by its
    # descriptor; message types from ever new descriptor pools must not make
    # that memory grow for ever.
    monkeypatch.setattr(_inline_buffers, '_SHAPES_MAX', 10)
    with SharedBuffer.copy_from(b'abc') as buffer:
        for _ in range(8):
            Holder = _buffer_holder_class(descriptor_pool.DescriptorPool())
            ref = message_factory.GetMessageClass(Holder.DESCRIPTOR.fields_by_name['one'].message_type)
            message = Holder(one=ref.FromString(buffer.ref.SerializeToString()), note=b'n')
            message.many.add().MergeFrom(message.one)
            assert inline_size(message, [buffer]) == inline_buffers(message, [buffer]).ByteSize()
            assert len(_inline_buffers._SHAPES) <= 10


@pytest.mark.parametrize('size', [1, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152])
def test_inline_size_is_the_size_of_the_inlined_message(size: int) -> None:
    Holder = _buffer_holder_class()
    with SharedBuffer.copy_from(os.urandom(size)) as big, SharedBuffer.copy_from(b'small') as small, \
            SharedBuffer.copy_from(b'not passed') as absent:
        message = Holder(one=big.ref, many=[small.ref, big.ref, absent.ref], note=b'n' * (size % 200))
        message.inner.inner.one.CopyFrom(small.ref)
        message.inner.many.add().CopyFrom(big.ref)
        message.by_name['a'].CopyFrom(big.ref)
        message.by_name['b'].CopyFrom(absent.ref)
        already = message.inner.by_name['c']
        already.CopyFrom(small.ref)
        already.inline_data = b'small'  # filled before: left as it is
        assert inline_size(message, [big, small]) == inline_buffers(message, [big, small]).ByteSize()
        assert inline_size(message, []) == message.ByteSize()




def test_the_limit_check_skips_its_walk_only_where_no_message_of_that_size_could_pass_the_limit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The check bounds what inlining adds from the message's size alone; the
    # bound must hold for a buffer named many times, at any depth, in a map.
    Holder = _buffer_holder_class()
    with SharedBuffer.copy_from(os.urandom(1000)) as buffer, SharedBuffer.copy_from(b'x') as tiny, \
            SharedBuffer(os.dup(buffer.fileno()), 1000, handle=0) as nameless:
        for buffers in ([buffer], [tiny, buffer], [nameless]):
            for times in (1, 2, 200):
                message = Holder(many=[buffers[-1].ref] * times)
                message.inner.inner.one.CopyFrom(buffers[-1].ref)
                message.by_name['a'].CopyFrom(buffers[0].ref)
                message.by_name[''].CopyFrom(buffers[-1].ref)  # (an entry of the fewest bytes)
                exact = inline_size(message, buffers)
                for limit in (exact - 1, exact, exact + 1):
                    expected = exact if exact > limit else None
                    assert _inline_buffers.inline_size_over(message, buffers, limit) == expected, (times, limit)

    def walked(*_: Any) -> int:
        raise AssertionError('walked the fields of a request that fits whatever they hold')

    monkeypatch.setattr(_inline_buffers, '_growth', walked)
    with SharedBuffer.copy_from(os.urandom(64)) as buffer:
        assert _inline_buffers.inline_size_over(Holder(one=buffer.ref), [buffer], 16 * MiB) is None
