"""Explicit zero-copy buffers: :class:`SharedBuffer` and how messages carry them.

A message refers to a buffer with a ``vyra.ipc.SharedBufferRef`` field (its
handle and size); the buffer itself travels beside the message as a sealed
memfd on the fast lane, and the receiver maps the very same pages:

- a client passes buffers with a request: ``call_method(..., buffers=[...])``;
  the handler gets them with :func:`shared_buffer` (``request.image``, ``context``);
- a handler answers with buffers: ``return attach_buffers(context, reply, *buffers)``;
  the client asks for them with ``call_method(..., return_buffers=True)`` and
  gets them with :func:`shared_buffer` (``reply.image``, the received buffers).

Where descriptors cannot travel (the gRPC lane, a peer that is not
vyra_base_ipc, shared memory switched off) the library copies each buffer's
bytes into its reference's ``inline_data`` instead, and :func:`shared_buffer`
returns a view of those: the same handler code works on both lanes.
"""

from __future__ import annotations

import operator
import os
import pickle
import random
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    ItemsView,
    Iterator,
    KeysView,
    Mapping,
    Sequence,
    TypeVar,
    ValuesView,
)
import warnings

from google.protobuf.message import Message

from . import shared_memory_pb2
from ._inline_buffers import inline_buffers, inline_size
from ._payload import (
    MAX_BUFFERS_PER_MESSAGE,
    SharedMemoryError,
    map_sealed,
    read_only,
    seal_bytes,
    shared_memory_unavailable,
)
from ._segment_pool import Segment, new_segment, pool_unavailable, segment_pool, segments_lock

if TYPE_CHECKING:
    from .ttrpc._segment_link import SegmentLink

__all__ = ['ReceivedBuffers', 'SharedBuffer', 'SharedBufferRef', 'attach_buffers', 'check_buffers',
           'inline_buffers', 'inline_request', 'inline_size', 'received_buffer', 'shared_buffer']

#: Where handles come from: they name buffers within one message, so they
#: must differ, not be secret. A generator of this module's own (seeded by
#: the OS, again in a forked child) costs no system call per buffer, and no
#: program's random.seed() makes two processes' handles the same.
_handles = random.Random()
os.register_at_fork(after_in_child=_handles.seed)

SharedBufferRef = shared_memory_pb2.SharedBufferRef
#: A response message (:func:`attach_buffers` returns the type it is given).
_Message = TypeVar('_Message', bound=Message)


class SharedBuffer:
    """Bytes in sealed shared memory, handed to the other process by
    reference instead of being copied through the socket.

    Write into one in place (:meth:`allocate`), or copy bytes into one
    (:meth:`copy_from`); put :attr:`ref` in a ``vyra.ipc.SharedBufferRef``
    field of a request, and pass the buffer with the call::

        with SharedBuffer.allocate(width * height * 3) as frame:
            camera.read_into(frame.view())            # or numpy.frombuffer(frame.view(), ...)
            request = DetectRequest(image=frame.ref)
            await ipc.call_method('Detect', request, buffers=[frame])

    Sent, its contents never change again (the owner's pages are not
    written while any receiver may read them, see :mod:`._segment_pool`), so
    one buffer may be sent any number of times, to any number of calls,
    concurrently. Close it (or use ``with``) when no more calls will send
    it: its memory goes back to this process's pool once every receiver let
    go of it too. Thread-safe, close() included (see :meth:`close`).

    Buffers received from the other side are SharedBuffers too (see
    :class:`ReceivedBuffers`): read them with :meth:`view`, or send them on
    unchanged, without a copy.
    """

    __slots__ = ('_fd', '_size', '_handle', '_view', '_public', '_managed', '_segment', '_lent', '_sent',
                 '__weakref__')

    def __init__(self, fd: int, size: int, handle: int | None = None, *,
                 view: memoryview | None = None, managed: bool = False,
                 segment: Segment | None = None, lent: bool = False) -> None:
        """Take ownership of ``fd``, a sealed memfd of ``size`` bytes (use
        :meth:`allocate` or :meth:`copy_from` to make one).

        :param handle: the name of the buffer in references (random if ``None``).
        :param view: a read-only mapping of it, if one was made already.
        :param managed: made by the library (received, or held for an
            answer): closed without a warning when garbage-collected.
        :param segment: the pooled segment of this process that holds it
            (this object is one of its users until closed); ``fd`` is then
            the segment's own, which this object does not close.
        :param lent: ``view`` is a segment another process lent to this one
            (given back when the view is gone).
        """
        self._fd = fd
        self._size = size
        self._handle = _handles.getrandbits(64) if handle is None else handle
        self._view = view
        #: What view() returns of ``view``: read-only down to its .obj (made on first use).
        self._public: memoryview | None = None
        self._managed = managed
        self._segment = segment
        self._lent = lent
        self._sent = segment is None

    @classmethod
    def allocate(cls, size: int) -> 'SharedBuffer':
        """A new buffer of ``size`` bytes to write in place, from this
        process's pool of shared memory (a new segment if the pool is
        exhausted): :meth:`view` is writable until the buffer is first sent
        (or :meth:`freeze` d), read-only afterwards. Write a camera frame or
        a NumPy array straight into it, send it: no copy on the way. Its
        bytes are not zeroed (a reused segment holds what it held before).

        :raises TypeError, ValueError: ``size`` is not a non-negative int (a NumPy integer will do).
        :raises SharedMemoryError: shared memory is unavailable here (or
            pooled segments are: Linux before 5.1), or no segment of ``size``
            bytes can be made (the message names the size).
        """
        if isinstance(size, bool) or not hasattr(type(size), '__index__'):
            raise TypeError(f'size must be an int, not {type(size).__name__}')
        size = operator.index(size)  # (numpy.prod(image.shape) is a numpy.int64)
        if size < 0:
            raise ValueError(f'size must be >= 0, not {size}')
        reason = shared_memory_unavailable() or pool_unavailable()
        if reason is not None:
            raise SharedMemoryError(f'shared memory is not available: {reason}')
        return cls._pooled(size)

    @classmethod
    def _pooled(cls, size: int, fill: Any = None) -> 'SharedBuffer':
        # From the pool, or a segment of its own if the pool is full.
        pool = segment_pool()
        segment = pool.acquire(size, fill)
        if segment is None:
            segment = new_segment(size, fill=fill)
            if fill is not None:
                pool.count_written(size)
        # No descriptor of its own: the segment's already costs two (the
        # memfd, and mmap's copy of it before Python 3.13).
        return cls(segment.fd, size, segment=segment)

    @classmethod
    def copy_from(cls, data: Any) -> 'SharedBuffer':
        """Copy ``data`` (anything with the buffer protocol: bytes, bytearray,
        memoryview, a C-contiguous NumPy array) into shared memory from the
        pool (see :meth:`allocate`); the buffer is frozen.

        :raises TypeError, ValueError: ``data`` exposes no buffer, or one not C-contiguous.
        :raises SharedMemoryError: shared memory is unavailable here.
        """
        view = memoryview(data)
        if not view.c_contiguous:
            layout = 'a Fortran-ordered' if view.f_contiguous else 'a strided'
            raise ValueError(f'SharedBuffer.copy_from() needs a C-contiguous buffer, not {layout} one '
                             '(for NumPy: numpy.ascontiguousarray())')
        view = pickle.PickleBuffer(view).raw()  # its bytes, whatever its shape (cast() refuses an empty 2-D)
        reason = shared_memory_unavailable()
        if reason is not None:
            raise SharedMemoryError(f'shared memory is not available: {reason}')
        if pool_unavailable() is not None:
            return cls(seal_bytes(view, 'vyra-ipc-buffer'), view.nbytes)
        buffer = cls._pooled(view.nbytes, view)
        buffer._sent = True
        return buffer

    def share(self) -> 'SharedBuffer':
        """Another SharedBuffer for the same memory, with a descriptor of its own unless it
        is pooled (closed without a warning when garbage-collected): what the library keeps
        of a buffer until it has been sent. Freezes this one (it is as good as sent).

        :raises ValueError: the buffer is closed.
        """
        with segments_lock():  # (see close())
            fd = self._open_fd()
            self._sent = True
            segment, view = self._segment, self._view
            if segment is None:
                fd = os.dup(fd)
            else:
                segment.use()  # the new buffer's (the descriptor is the segment's: shared, not owned)
        shared = SharedBuffer(fd, self._size, self._handle, view=view, managed=True, segment=segment,
                              lent=self._lent)
        shared._sent = True
        return shared

    @property
    def size(self) -> int:
        """Length in bytes."""
        return self._size

    @property
    def handle(self) -> int:
        """A random 64-bit number naming this buffer in :attr:`ref`."""
        return self._handle

    @property
    def ref(self) -> SharedBufferRef:
        """A new ``vyra.ipc.SharedBufferRef`` naming this buffer, to assign into a message."""
        return SharedBufferRef(handle=self._handle, size=self._size)

    @property
    def closed(self) -> bool:
        """Whether this object no longer holds its memfd (closed, or handed over)."""
        return self._fd < 0

    @property
    def writable(self) -> bool:
        """Whether :meth:`view` is writable (allocated, not yet sent or frozen)."""
        return not self._sent and self._fd >= 0

    def freeze(self) -> None:
        """Make the contents final: :meth:`view` is read-only from now on (sending does this too).
        Views taken before stay writable: do not write through them once the buffer was sent."""
        self._sent = True

    def fileno(self) -> int:
        """The memfd: this object's own, or its pooled segment's (valid until it is closed:
        where another thread may close the buffer, use :meth:`dup` instead).

        :raises ValueError: the buffer is closed.
        :raises ForkedProcessError: it is pooled memory of the parent, inherited through ``fork()``.
        """
        return self._open_fd()

    def _open_fd(self) -> int:
        # The descriptor, or why there is none. Under segments_lock() for any
        # use of it: close() cannot come between this check and the use.
        fd = self._fd
        if fd < 0:
            raise ValueError(f'the SharedBuffer of {self._size} bytes (handle {self._handle:#018x}) '
                             'is closed')
        segment = self._segment
        if segment is not None and segment.inherited:
            segment.refuse_inherited(repr(self))
        return fd

    def dup(self) -> int:
        """A new descriptor of the memfd for sending; the caller owns it.

        :raises ValueError: the buffer is closed.
        """
        with segments_lock():
            return os.dup(self._open_fd())

    def view(self) -> memoryview:
        """A view of the contents, mapping the shared pages (no copy):
        writable for a buffer :meth:`allocate` d and not yet sent, read-only
        otherwise (so is its ``.obj``: ``numpy.frombuffer(view.obj)`` is a
        read-only array too). Valid as long as it is referenced, even after
        :meth:`close`: the memory is not reused while it is.

        :raises ValueError: the buffer is closed.
        """
        with segments_lock():
            fd = self._open_fd()
            segment = self._segment
            if segment is not None:
                return segment.user_view(self._size, not self._sent)
            public = self._public
            if public is None:
                if self._view is None:  # (a memfd of its own: pooled segments unavailable)
                    self._view = map_sealed(fd, self._size, repr(self), populate=False)
                public = self._public = read_only(self._view)
            return public

    def read(self) -> bytes:
        """A copy of the contents (without mapping them).

        :raises ValueError: the buffer is closed.
        """
        with segments_lock():
            fd = self._open_fd()
            if not self._size:
                return b''
            segment = self._segment
            if segment is None:
                fd = os.dup(fd)  # this read's own: the buffer's may be closed meanwhile
            else:
                segment.use()  # the segment, and its descriptor, stay until unuse()
        try:
            return os.pread(fd, self._size, 0)
        finally:
            if segment is None:
                os.close(fd)
            else:
                segment.unuse()

    def lend_to(self, link: SegmentLink | None, new_memfd: Callable[[int], bool] | None = None,
                hand_over: bool = False) -> tuple[int, int, int]:
        """How this buffer goes with a message: ``(descriptor, lend id,
        segment id)`` (zeros where it is not lent, or not from this
        process's pool). Freezes it. Pooled memory is lent on ``link`` (the
        connection's, if it agreed on pooled segments; the lend holds it);
        where it was not agreed (an older peer accepts only those), or the
        peer holds all the lends it may (:meth:`SegmentLink.may_lend`), a new
        sealed memfd holds a copy if ``new_memfd(size)`` allows. The caller owns it.

        :param hand_over: the buffer is not sent again (a :meth:`share` the
            library keeps for one answer): a memfd of its own goes as it is,
            not a copy of its descriptor (the buffer then holds none; its
            view stays until it is closed).
        :raises ValueError: the buffer is closed.
        :raises SharedMemoryError: no memfd could be made for the copy, or ``new_memfd`` refused it.
        """
        with segments_lock():  # (see close())
            fd = self._open_fd()
            self._sent = True
            segment, view = self._segment, self._view
            if segment is None and (not self._lent or (link is not None and link.may_lend())):
                if not hand_over:
                    fd = os.dup(fd)
                else:
                    self._fd = -1  # (a system call less, and one less to close it)
                if not self._lent:
                    return fd, 0, 0
            elif segment is not None:
                segment.use()  # this call's: the lend takes it over, or it is let go below
            else:
                fd = -1
        if segment is None:  # lent to this process: lent on, or copied
            if fd >= 0:
                assert link is not None
                return fd, link.lend(view), 0  # keeps this end's lend from its owner
            self._may_copy(new_memfd)
            return seal_bytes(view, 'vyra-ipc-buffer'), 0, 0
        if link is not None and link.may_lend(segment.capacity, segment_pool()):
            try:
                fd = os.dup(segment.fd)
            except BaseException:
                segment.unuse()
                raise
            return fd, link.lend(segment), segment.id
        try:
            self._may_copy(new_memfd)
            return seal_bytes(segment.user_view(self._size, False), 'vyra-ipc-buffer'), 0, 0
        finally:
            segment.unuse()

    def _may_copy(self, new_memfd: Callable[[int], bool] | None) -> None:
        if new_memfd is not None and not new_memfd(self._size):
            raise SharedMemoryError(f'{self!r}: the peer has not read the new memfds sent to it: no copy now')

    def close(self) -> None:
        """Close this process's descriptor and let go of its mapping;
        idempotent. Copies already sent stay valid for their receivers,
        views for whoever still holds them.

        Another thread may close a buffer that a call is sending: close()
        then waits only while that call takes its own hold of the memory (a
        descriptor, or a use of the pooled segment: microseconds, never the
        send), and that call sends the contents as they were. Whatever begins
        after close() raises :class:`ValueError`. So the memory is not
        handed out again while anything holds it, and a file that took the
        number of the closed descriptor is never sent in its place."""
        if self._fd < 0 and self._view is None:
            return  # closed already (never opened again): its memory was let go of then
        with segments_lock():
            fd, segment, view, public = self._fd, self._segment, self._view, self._public
            self._fd = -1
            self._segment = self._view = self._public = None
        del view, public  # (the last reference to a lend gives it back: outside the lock)
        if segment is not None:
            segment.unuse()  # (the descriptor is the segment's)
        elif fd >= 0:
            os.close(fd)

    def __enter__(self) -> 'SharedBuffer':
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        if getattr(self, '_fd', -1) >= 0:
            if not self._managed:
                _warn(f'unclosed SharedBuffer of {self._size} bytes', ResourceWarning, source=self)
            self.close()

    def __repr__(self) -> str:
        state = ' closed' if self.closed else ''
        return f'<SharedBuffer {self._size} bytes handle={self._handle:#018x}{state}>'


class ReceivedBuffers(Mapping[int, SharedBuffer]):
    r"""The explicit buffers that arrived with one message, by handle.

    They close when this object is garbage-collected or :meth:`close`\ d;
    views taken from them stay valid as long as they are referenced.
    """

    __slots__ = ('_buffers', '_nbytes')

    def __init__(self, buffers: Mapping[int, SharedBuffer] = {}) -> None:
        self._buffers = dict(buffers)
        #: Bytes of all the buffers.
        self._nbytes = sum(buffer.size for buffer in self._buffers.values())

    @classmethod
    def _adopt(cls, buffers: dict[int, SharedBuffer], nbytes: int) -> 'ReceivedBuffers':
        # The library's own: ``buffers`` (not copied), of ``nbytes`` bytes in all.
        received = cls.__new__(cls)
        received._buffers = buffers
        received._nbytes = nbytes
        return received

    def __getitem__(self, handle: int) -> SharedBuffer:
        return self._buffers[handle]

    def __iter__(self) -> Iterator[int]:
        return iter(self._buffers)

    def __len__(self) -> int:
        return len(self._buffers)

    # The dict's own views and lookups: Mapping's would call back into
    # __iter__ and __getitem__ for every buffer, in Python.

    def __contains__(self, handle: object) -> bool:
        return handle in self._buffers

    def keys(self) -> KeysView[int]:
        return self._buffers.keys()

    def values(self) -> ValuesView[SharedBuffer]:
        return self._buffers.values()

    def items(self) -> ItemsView[int, SharedBuffer]:
        return self._buffers.items()

    def buffer(self, ref: SharedBufferRef) -> SharedBuffer:
        """The buffer ``ref`` (a ``vyra.ipc.SharedBufferRef``) names, e.g. to
        send it on.

        :raises SharedMemoryError: no buffer of that handle and size came with the message.
        """
        buffer = self._buffers.get(ref.handle)
        if buffer is None or buffer.size != ref.size:
            raise SharedMemoryError(
                f'the message refers to shared buffer {ref.handle:#018x} ({ref.size} bytes), '
                'which was not sent with it')
        return buffer

    def view(self, ref: SharedBufferRef) -> memoryview:
        """A read-only view of the buffer ``ref`` names.

        :raises SharedMemoryError: as :meth:`buffer`.
        """
        return self.buffer(ref).view()

    def close(self) -> None:
        """Close every buffer's descriptor; idempotent."""
        for buffer in self._buffers.values():
            buffer.close()

    def __repr__(self) -> str:
        return f'<ReceivedBuffers {len(self._buffers)}>'


def shared_buffer(ref: SharedBufferRef, source: Any = None) -> memoryview:
    """A read-only view of the buffer a ``vyra.ipc.SharedBufferRef`` names.

    On the fast lane the view maps the sender's shared memory: no copy is
    made, and it stays valid as long as the view is referenced. Where the
    buffer travelled inline (the gRPC lane, or a peer without shared memory),
    it is a view of ``ref.inline_data``. For a NumPy array:
    ``numpy.frombuffer(shared_buffer(ref, context), dtype)`` (read-only).

    :param source: in a handler, its ``context`` (the buffers of the
        request); in a client, the :class:`ReceivedBuffers` that
        ``call_method(..., return_buffers=True)`` returned with the reply.
    :raises TypeError: ``ref`` is not a ``vyra.ipc.SharedBufferRef``.
    :raises SharedMemoryError: the buffer was not sent with the message.
    """
    inline = _inline_data(ref, 'shared_buffer')
    if inline or ref.size == 0:
        return memoryview(inline).toreadonly()
    buffers = source if isinstance(source, ReceivedBuffers) else getattr(source, '_buffers', None)
    return (buffers or _NONE).view(ref)


_NONE = ReceivedBuffers()


def _inline_data(ref: Any, function: str) -> bytes:
    """``ref.inline_data``; a TypeError naming what ``ref`` is if it is no reference."""
    try:
        return ref.inline_data
    except AttributeError:
        hint = ' (a SharedBuffer of this process: use its view())' if isinstance(ref, SharedBuffer) else ''
        raise TypeError(f'{function}() needs a vyra.ipc.SharedBufferRef, the field of the message that '
                        f'names the buffer (e.g. request.image), not {type(ref).__name__}{hint}') from None


def received_buffer(ref: SharedBufferRef, source: Any = None) -> SharedBuffer:
    """The :class:`SharedBuffer` a ``vyra.ipc.SharedBufferRef`` names, to
    send it on without a copy (e.g. with :func:`attach_buffers`). Where the
    buffer travelled inline, a new one holding a copy of ``ref.inline_data``.
    Closed by the library (when the call ends, or when collected).

    :param source: as for :func:`shared_buffer`.
    :raises TypeError: ``ref`` is not a ``vyra.ipc.SharedBufferRef``.
    :raises SharedMemoryError: the buffer was not sent with the message.
    """
    inline = _inline_data(ref, 'received_buffer')
    if inline or ref.size == 0:
        copy = SharedBuffer.copy_from(inline)
        copy._handle = ref.handle
        copy._managed = True
        return copy
    buffers = source if isinstance(source, ReceivedBuffers) else getattr(source, '_buffers', None)
    return (buffers or _NONE).buffer(ref)


def attach_buffers(context: Any, response: _Message, *buffers: SharedBuffer) -> _Message:
    """Answer with ``buffers`` (:class:`SharedBuffer` objects, made here or
    received): call it on the response a unary handler returns, whose
    ``SharedBufferRef`` fields name them.

    For example::

        with SharedBuffer.copy_from(mask_array) as mask:
            return attach_buffers(context, DetectReply(mask=mask.ref), mask)

    The answer keeps descriptors of its own: the buffers may be closed once
    this returns.

    On the fast lane, to a client that agreed on shared memory, the single
    answer of a method that does not stream its responses takes them as
    descriptors (the client gets them with ``return_buffers=True``);
    otherwise (the gRPC lane, a streamed message) their bytes are copied
    into the references' ``inline_data`` of the returned copy of
    ``response``. Returns the response to send, a message of ``response``'s
    class (so a handler's return type holds).

    :raises TypeError, ValueError: as :func:`check_buffers`.
    """
    check_buffers(getattr(context, '_method', 'this method'), False, buffers)
    attach = getattr(context, '_attach_buffers', None)
    if attach is not None and attach(buffers):
        return response
    return inline_buffers(response, buffers)


def check_buffers(path: str, request_streaming: bool, buffers: Sequence[SharedBuffer]) -> None:
    """Check the buffers of a message of method ``path``.

    :raises TypeError: the method streams (buffers travel only with single
        messages), ``buffers`` is no list, or an item is not a :class:`SharedBuffer`.
    :raises ValueError: a buffer is closed, or more than
        :data:`~vyra_base_ipc._payload.MAX_BUFFERS_PER_MESSAGE` of them.
    """
    if request_streaming:
        raise TypeError(f'{path} streams its requests: buffers= needs a unary request')
    if not hasattr(buffers, '__len__'):  # one SharedBuffer (not in a list), a generator
        raise TypeError(f'{path}: buffers must be a list of SharedBuffers, not {type(buffers).__name__}')
    if len(buffers) > MAX_BUFFERS_PER_MESSAGE:
        raise ValueError(f'{path}: {len(buffers)} buffers in one call; at most '
                         f'{MAX_BUFFERS_PER_MESSAGE} (put more data into fewer SharedBuffers)')
    for buffer in buffers:
        if not isinstance(buffer, SharedBuffer):
            raise TypeError(f'buffers must be SharedBuffer objects, not {type(buffer).__name__}')
        if buffer.closed:
            raise ValueError(f'{buffer!r} is closed')


def inline_request(path: str, request_streaming: bool, message: Any,
                   buffers: Sequence[SharedBuffer]) -> Any:
    """``message`` as it must go where descriptors cannot travel: checked
    (:func:`check_buffers`) and with the bytes of ``buffers`` copied into its
    references; ``message`` itself when there are no buffers."""
    if not buffers:
        return message
    check_buffers(path, request_streaming, buffers)
    return inline_buffers(message, buffers)
