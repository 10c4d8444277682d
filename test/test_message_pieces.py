"""Large messages serialized in pieces (:mod:`vyra_base_ipc.ttrpc._pieces`):
every field shape parses back as the same message, what pieces could
change is serialized whole, both ends of the fast lane use them in a
process that keeps freed memory (and only there), and a client faults in
no fresh memory per call either way. Real protobuf classes (the test
protos); the transport's paths with pieces run in .ci/kept-memory."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
import random
import subprocess
import sys
from types import SimpleNamespace
from typing import Any, Callable

import pytest

from conftest import LONG, SERVERS, StartServer
from vyra_base_ipc._payload import Pieces, seal_bytes
from vyra_base_ipc.ttrpc._pieces import MIN_PIECE, pieces

#: An unknown field: number 99, varint 1.
UNKNOWN = bytes((0x98, 0x06, 0x01))


@pytest.fixture(scope='module')
def pb(test_protos_dir: Any) -> SimpleNamespace:
    from vyra_ipc_test import pieces_legacy_pb2, pieces_pb2

    return SimpleNamespace(**{name: getattr(module, name) for module in (pieces_pb2, pieces_legacy_pb2)
                              for name in module.DESCRIPTOR.message_types_by_name},
                           tag=pieces_legacy_pb2.tag)


def large(seed: int, size: int = 2 * MIN_PIECE) -> bytes:
    return random.Random(seed).randbytes(size)


def every_field(pb: SimpleNamespace) -> Any:
    frame = pb.Frame(header=pb.Header(stamp=-5, frame_id='camera'), width=640, data=large(1),
                     calibration=[0.5, -1.25], labels={'a': 'b', 'c': ''}, thumbnail=b'small',
                     exposure=0, note='a note', gain=2.5, chunks=[b'x', b'', large(2, 10)], kind=1)
    frame.frames['left'].stamp = 7
    frame.history.add(frame_id='h1')
    frame.history.add()
    frame.previous.width = 3
    frame.blob.name = 'blob'
    return frame


#: Messages whose large bytes fields pieces set apart, by shape.
SHAPES: dict[str, Callable[[SimpleNamespace], Any]] = {
    'a top-level bytes field': lambda pb: pb.Frame(data=large(1)),
    'every field shape set': every_field,
    'in a submessage': lambda pb: pb.Frame(blob=pb.Blob(data=large(1), name='x'), width=1),
    'two submessages down': lambda pb: pb.FrameReply(frame=pb.Frame(blob=pb.Blob(inner=pb.Blob(data=large(1)))),
                                                     status='ok'),
    'in a recursive type': lambda pb: pb.Frame(previous=pb.Frame(data=large(1), previous=pb.Frame(width=3))),
    'in a oneof': lambda pb: pb.Frame(raw=large(1), width=2),
    'with presence': lambda pb: pb.Frame(thumbnail=large(1)),
    'several, at every level': lambda pb: pb.FrameReply(frame=pb.Frame(
        data=large(1), thumbnail=large(2), blob=pb.Blob(data=large(3), inner=pb.Blob(data=large(4))))),
    'beside a proto2 group': lambda pb: pb.WithGroup(data=large(1), part=pb.WithGroup.Part(blob=b'in a group')),
}


def parsed(message: Any, split: Pieces) -> Any:
    """``split`` parsed as ``message``'s type, after checking that writing it
    into a buffer gives the bytes it joins to."""
    joined = bytes(split)
    assert len(joined) == len(split)
    view = memoryview(bytearray(len(split) + 3))
    split.write_into(view)
    assert bytes(view[:len(split)]) == joined
    return type(message).FromString(joined)


@pytest.mark.parametrize('shape', SHAPES)
def test_every_field_shape_parses_back_as_the_same_message(pb: SimpleNamespace, shape: str) -> None:
    message = SHAPES[shape](pb)
    split = pieces(message)
    assert split is not None
    assert len(split) == message.ByteSize()
    assert parsed(message, split) == message
    # The large fields are pieces of their own, not in what protobuf serialized.
    assert len(split.parts[0]) < MIN_PIECE
    assert sum(len(part) for part in split.parts if len(part) >= MIN_PIECE) >= 2 * MIN_PIECE


def test_values_protobuf_tells_apart_from_the_default_stay_apart(pb: SimpleNamespace) -> None:
    frame = parsed_split(pb.Frame(data=large(1), gain=-0.0, exposure=0))
    assert math.copysign(1, frame.gain) == -1
    assert frame.HasField('exposure') and not frame.HasField('thumbnail')
    group = parsed_split(pb.WithGroup(data=large(1), defaulted=b'preset'))
    assert group.HasField('defaulted') and not group.HasField('part')
    assert not parsed_split(pb.WithGroup(data=large(1))).HasField('defaulted')


def parsed_split(message: Any) -> Any:
    split = pieces(message)
    assert split is not None
    return parsed(message, split)


def test_unknown_fields_beside_what_is_split_survive(pb: SimpleNamespace) -> None:
    frame = pb.Frame(data=large(1))
    frame.header.MergeFromString(UNKNOWN)  # (copied whole with its submessage)
    copy = parsed_split(frame)
    assert copy.header.SerializeToString() == frame.header.SerializeToString() == UNKNOWN


def test_messages_without_large_bytes_fields_are_serialized_whole(pb: SimpleNamespace) -> None:
    assert pieces(pb.Frame(data=large(1, MIN_PIECE - 1), thumbnail=large(2, MIN_PIECE - 1))) is None
    assert pieces(pb.Header(frame_id='x' * 2 * MIN_PIECE)) is None  # (no bytes field)
    assert pieces(pb.Frame(data=large(1, MIN_PIECE))) is not None


def test_what_pieces_could_change_is_serialized_whole(pb: SimpleNamespace) -> None:
    # Required fields: protobuf refuses a message without them, and the rest
    # alone would lack them. Extensions: not fields of the type.
    assert pieces(pb.WithRequired(data=large(1))) is None
    extended = pb.Extendable(data=large(1))
    extended.Extensions[pb.tag] = 'tagged'
    assert pieces(extended) is None
    # Unknown fields where the message is split: the rest is a new message without them.
    top = pb.Frame.FromString(pb.Frame(data=large(1)).SerializeToString() + UNKNOWN)
    assert pieces(top) is None
    inner = pb.FrameReply(frame=pb.Frame(data=large(1)))
    inner.frame.MergeFromString(UNKNOWN)
    assert pieces(inner) is None


def test_a_memfd_made_from_pieces_holds_them_joined() -> None:
    split = Pieces([b'head', large(1), b'', large(2, 100)], 4 + 2 * MIN_PIECE + 100)
    fd = seal_bytes(split)
    try:
        assert os.pread(fd, len(split) + 1, 0) == bytes(split)
    finally:
        os.close(fd)


# -- both ends of the fast lane ----------------------------------------------------------------

#: Serializes a large request as the fast-lane client does, and an answer as
#: its server does (the response serializer of a generated servicer's
#: method), with shared memory agreed, after keep_freed_memory() if argv[1]
#: is 'keep'; prints what each gave, as JSON.
SERIALIZE = """
import json, sys
import grpc
from vyra_base_ipc import SharedMemoryOptions, keep_freed_memory
from vyra_base_ipc._methods import Method, MethodKind, _checked_answers
from vyra_base_ipc.ttrpc._call import serialize
from vyra_base_ipc.ttrpc._hello import PLAIN, Agreement
from vyra_base_ipc.ttrpc._pieces import serialized
from vyra_ipc_test import echo_pb2

if sys.argv[1] == 'keep':
    keep_freed_memory()
options = SharedMemoryOptions(threshold=1 << 20)
path = '/vyra.ipc.test.EchoService/Echo'
method = Method(name='Echo', path=path, kind=MethodKind.UNARY_UNARY,
                request_serializer=echo_pb2.EchoRequest.SerializeToString,
                response_deserializer=echo_pb2.EchoReply.FromString)
own = Method(name='Echo', path=path, kind=MethodKind.UNARY_UNARY,
             request_serializer=lambda message: b'own:' + message.SerializeToString(),
             response_deserializer=echo_pb2.EchoReply.FromString)
checked = _checked_answers(path, grpc.unary_unary_rpc_method_handler(
    lambda request, context: request, request_deserializer=echo_pb2.EchoRequest.FromString,
    response_serializer=echo_pb2.EchoReply.SerializeToString)).response_serializer

def outcome(message, payload):
    data = bytes(payload)
    same = type(message).FromString(data) == message if not data.startswith(b'own:') else None
    return [type(payload).__name__, same]

request = echo_pb2.EchoRequest(text='frame', payload=bytes(range(256)) * 8192)
reply = echo_pb2.EchoReply(text='frame', payload=request.payload, index=4)
results = {
    'client': outcome(request, serialize(method, request, 1 << 30, Agreement(shared_memory=options))),
    'client, no shared memory': outcome(request, serialize(method, request, 1 << 30, PLAIN)),
    "client, a serializer of the caller's own": outcome(
        request, serialize(own, request, 1 << 30, Agreement(shared_memory=options))),
    'server': outcome(reply, serialized(checked, reply, options)),
}
class Custom:  # a message class of the caller's own, with a serializer by protobuf's name
    def SerializeToString(self):
        return b'own:custom'

results["a class of the caller's own"] = outcome(Custom(), serialized(Custom.SerializeToString, Custom(), options))
try:
    serialized(checked, request, options)
    results['server, the wrong type'] = 'serialized'
except TypeError as error:
    results['server, the wrong type'] = str(error)
print(json.dumps(results))
"""


@pytest.mark.parametrize('keep', [False, True], ids=['glibc as it is', 'keep_freed_memory()'])
def test_both_ends_serialize_large_messages_in_pieces_where_malloc_keeps_freed_memory(
        child_env: dict[str, str], keep: bool) -> None:
    result = subprocess.run([sys.executable, '-c', SERIALIZE, 'keep' if keep else '-'],
                            capture_output=True, text=True, env=child_env, timeout=LONG)
    assert result.returncode == 0, result.stderr
    outcomes = json.loads(result.stdout)
    split = ['Pieces' if keep else 'bytes', True]
    assert outcomes.pop('client') == split
    assert outcomes.pop('server') == split
    # The answer's type is checked in pieces too, with the same words.
    assert outcomes.pop('server, the wrong type') == ('the handler of /vyra.ipc.test.EchoService/Echo returned '
                                                      'vyra.ipc.test.EchoRequest, not a vyra.ipc.test.EchoReply')
    assert outcomes == {'client, no shared memory': ['bytes', True],
                        "client, a serializer of the caller's own": ['bytes', None],
                        "a class of the caller's own": ['bytes', None]}


#: Prints keeps_freed_memory() after keep_freed_memory() (argv[1] 'call'), or as the environment left it.
KEEPS = """
import sys
from vyra_base_ipc import keep_freed_memory
from vyra_base_ipc._allocator import keeps_freed_memory
if sys.argv[1] == 'call':
    keep_freed_memory()
print(keeps_freed_memory())
"""


@pytest.mark.parametrize('how, env, kept', [
    ('glibc as it is', {}, False),
    ('keep_freed_memory()', {}, True),
    ('environment', {'MALLOC_MMAP_MAX_': '0', 'MALLOC_TRIM_THRESHOLD_': str(1 << 30)}, True),
    ('environment, trims sooner', {'MALLOC_MMAP_MAX_': '0', 'MALLOC_TRIM_THRESHOLD_': str(1 << 20)}, False),
    ('environment, maps large blocks', {'MALLOC_TRIM_THRESHOLD_': str(1 << 30)}, False),
])
def test_a_process_keeps_freed_memory_by_the_call_or_its_environment(
        child_env: dict[str, str], how: str, env: dict[str, str], kept: bool) -> None:
    result = subprocess.run([sys.executable, '-c', KEEPS, 'call' if how == 'keep_freed_memory()' else '-'],
                            capture_output=True, text=True, env={**child_env, **env}, timeout=LONG)
    assert (result.returncode, result.stdout) == (0, f'{kept}\n'), result.stderr


@pytest.mark.parametrize('keep', [False, True], ids=['glibc as it is', 'keep_freed_memory()'])
def test_a_client_echoing_large_messages_faults_in_no_fresh_memory_per_call(
        start_server: StartServer, socket_path: Path, child_env: dict[str, str], keep: bool) -> None:
    # Found: with glibc's defaults, a client that sent 2 to 14 MiB in pieces
    # faulted in twice the message on every call (see _pieces).
    server = start_server(socket_path)
    size = 10 << 20
    result = subprocess.run([sys.executable, str(SERVERS / 'shm_peer.py'), str(server.socket_path), 'faults',
                             str(size), *(['keep'] if keep else [])],
                            capture_output=True, text=True, env=child_env, timeout=LONG)
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout)
    assert measured['exact'] is True
    assert measured['faults'] < size // 4096 // 4, measured  # a quarter of the message's pages


def test_a_message_goes_inline_as_its_bytes_pieces_joined_only_at_most_the_threshold_without_buffers() -> None:
    """``inline()``, what the fast lane's answers and requests test first:
    their bytes (pieces joined) when they travel inline, ``None`` when
    shared memory carries them."""
    from vyra_base_ipc._payload import SharedMemoryOptions
    from vyra_base_ipc.ttrpc._hello import PLAIN, Agreement
    from vyra_base_ipc.ttrpc._shared_memory import inline

    shared = Agreement(shared_memory=SharedMemoryOptions(threshold=MIN_PIECE))
    small, big = b'x' * MIN_PIECE, large(1)
    split = Pieces([big[:MIN_PIECE], big[MIN_PIECE:]], len(big))
    buffer: Any = object()  # (only whether there are any counts)
    assert inline(big, PLAIN) is big
    assert inline(split, PLAIN) == big
    assert inline(small, shared) is small
    assert inline(big, shared) is None
    assert inline(split, shared) is None
    assert inline(small, shared, (buffer,)) is None
    assert inline(b'', PLAIN, (buffer,)) == b''  # nothing agreed: everything inline (buffers refused elsewhere)
