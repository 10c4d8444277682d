"""The Hello: what two vyra_base_ipc ends agree on for one connection.

Right after connecting, a vyra_base_ipc client calls
``/vyra.ipc.ttrpc.Connection/Hello`` saying which of this package's
extensions of ttrpc it offers: shared memory (and with it pooled segments
given back with RELEASE frames), CANCEL frames, and flow control with the
window it grants per stream. A vyra_base_ipc server answers with
what it accepts and the window it grants in turn; every other ttrpc server
answers "unknown method", and the connection is then plain ttrpc. Both ends
use an extension only once they know the other agreed: the server from the
Hello, which arrives before any call; the client from the answer, which its
first call waits for.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from .. import ttrpc_pb2
from .._payload import SharedMemoryOptions
from .._segment_pool import pool_unavailable
from ._segment_link import SegmentLink

__all__ = ['HELLO_METHOD', 'HELLO_PATH', 'HELLO_SERVICE', 'PLAIN', 'Agreement', 'accept', 'offer', 'settle']

HELLO_SERVICE = 'vyra.ipc.ttrpc.Connection'
HELLO_METHOD = 'Hello'
HELLO_PATH = f'/{HELLO_SERVICE}/{HELLO_METHOD}'


@dataclasses.dataclass(frozen=True)
class Agreement:
    """The extensions in use on a connection, seen from one end.

    :ivar shared_memory: the options for large messages and buffers, or
        ``None`` if everything travels inline.
    :ivar cancel: whether the client may end a stream with a CANCEL frame.
    :ivar send_window: bytes of streamed messages this end may send on a
        stream before the peer grants more; 0 for no limit (no flow control).
    :ivar receive_window: bytes this end grants the peer per stream (and
        grants again as they are consumed); 0 if the peer sends without limit.
    :ivar segments: the connection's pooled shared memory (lends both
        ways), if both ends agreed on it; else ``None`` and every segment is
        a new memfd sealed against writes.
    :ivar new_memfd: whether a message of that many bytes may go to the
        peer in a new memfd (no pooled segment for it) rather than inline;
        ``None``: always (see :class:`._shared_memory.MemfdGate`).
    """

    shared_memory: SharedMemoryOptions | None = None
    cancel: bool = False
    send_window: int = 0
    receive_window: int = 0
    segments: SegmentLink | None = None
    new_memfd: Callable[[int], bool] | None = None


#: A connection without extensions: a peer that is not vyra_base_ipc.
PLAIN = Agreement()


def offer(shared_memory: SharedMemoryOptions | None, stream_window: int) -> bytes:
    """The client's Hello: every extension, shared memory if ``shared_memory``
    (pooled if this process can make pooled segments)."""
    return ttrpc_pb2.Hello(shared_memory=shared_memory is not None, cancel=True,
                           stream_window=stream_window, segment_pool=_pooled(shared_memory)
                           ).SerializeToString()


def _pooled(shared_memory: SharedMemoryOptions | None) -> bool:
    return shared_memory is not None and pool_unavailable() is None


def _link(shared_memory: SharedMemoryOptions | None, hello: ttrpc_pb2.Hello) -> SegmentLink | None:
    return SegmentLink() if hello.segment_pool and _pooled(shared_memory) else None


def accept(request: bytes | memoryview, shared_memory: SharedMemoryOptions | None,
           stream_window: int, new_memfd: Callable[[int], bool] | None = None,
           pooled: bool = True) -> tuple[Agreement, bytes]:
    """The server's side: what it agrees to for a client's Hello, and its
    answer. ``new_memfd`` becomes :attr:`Agreement.new_memfd`; without
    ``pooled``, pooled segments are declined whatever the client offers.

    :raises google.protobuf.message.DecodeError: the request is not a Hello.
    """
    hello = ttrpc_pb2.Hello.FromString(bytes(request))
    shared = shared_memory if hello.shared_memory else None
    agreement = Agreement(
        shared_memory=shared,
        cancel=hello.cancel,
        send_window=hello.stream_window,
        receive_window=stream_window if hello.stream_window else 0,
        segments=_link(shared, hello) if pooled else None,
        new_memfd=new_memfd)
    answer = ttrpc_pb2.Hello(shared_memory=agreement.shared_memory is not None, cancel=agreement.cancel,
                             stream_window=agreement.receive_window,
                             segment_pool=agreement.segments is not None)
    return agreement, answer.SerializeToString()


def settle(answer: bytes, shared_memory: SharedMemoryOptions | None, stream_window: int,
           new_memfd: Callable[[int], bool] | None = None) -> Agreement:
    """The client's side: what is agreed, given the server's answer to its
    Hello (which offered ``shared_memory`` and ``stream_window``);
    ``new_memfd`` becomes :attr:`Agreement.new_memfd`.

    :raises google.protobuf.message.DecodeError: the answer is not a Hello.
    """
    hello = ttrpc_pb2.Hello.FromString(answer)
    shared = shared_memory if hello.shared_memory else None
    return Agreement(shared_memory=shared,
                     cancel=hello.cancel,
                     send_window=hello.stream_window,
                     receive_window=stream_window if hello.stream_window else 0,
                     segments=_link(shared, hello), new_memfd=new_memfd)
