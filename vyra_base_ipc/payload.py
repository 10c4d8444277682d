"""Large payloads in shared memory: sealed memfds passed with fast-lane frames.

Two ways in, one mechanism:

- **Transparent**: a message whose serialized size is above the threshold
  (default 1 MiB) is written into a new memfd, sealed, and its descriptor
  is passed with the frame (``SCM_RIGHTS``); the frame carries a small
  manifest instead of the bytes. The receiver maps it read-only and parses
  the message straight from the mapping.
- **Explicit**: :class:`SharedBuffer` puts a buffer into shared memory once;
  a ``vyra.ipc.SharedBufferRef`` field in a message refers to it and the
  buffer is passed with the call (``call_method(..., buffers=[...])``); the
  handler gets a read-only :class:`memoryview` of the very same pages from
  :func:`shared_buffer`, without a copy.

Security model: a memfd has no name; only the processes a descriptor is
passed to can map it, and the kernel frees it when the last descriptor and
mapping are gone (nothing is left in ``/dev/shm`` after a crash). The sender
seals it against writes, shrinking and growing before passing it; the
receiver refuses any descriptor that is not a sealed memfd of exactly the
announced size, so what it mapped cannot change or shrink under it (no
``SIGBUS``, no read beyond its end).
"""

from __future__ import annotations

import dataclasses
import fcntl
import mmap
import os
import secrets
import stat
import sys
import threading
from typing import Any, Callable, Iterable, Sequence
import warnings

from . import shared_memory_pb2, ttrpc_pb2

__all__ = [
    'DEFAULT_MAX_SHARED_MEMORY_BYTES',
    'DEFAULT_SHARED_MEMORY_THRESHOLD',
    'ReceivedBuffers',
    'SharedBuffer',
    'SharedBufferRef',
    'SharedMemoryError',
    'SharedMemoryOptions',
    'TooLargeError',
    'shared_buffer',
    'shared_memory_unavailable',
]

SharedBufferRef = shared_memory_pb2.SharedBufferRef
Manifest = ttrpc_pb2.SharedMemoryManifest

#: Messages larger than this many bytes travel in shared memory (fast lane,
#: both ends vyra_base_ipc).
DEFAULT_SHARED_MEMORY_THRESHOLD = 1 << 20
#: Largest SharedBuffer accepted.
DEFAULT_MAX_SHARED_MEMORY_BYTES = 1 << 30
#: Descriptors one message may carry (its own memfd and its buffers); a
#: receiver reads at most this many at once.
MAX_FDS_PER_MESSAGE = 32
#: SharedBuffers one call may pass.
MAX_BUFFERS_PER_MESSAGE = MAX_FDS_PER_MESSAGE - 1

# Not all of these are in the fcntl module of every Python version.
_F_ADD_SEALS = getattr(fcntl, 'F_ADD_SEALS', 1033)
_F_GET_SEALS = getattr(fcntl, 'F_GET_SEALS', 1034)
_F_SEAL_SEAL = 0x0001
_F_SEAL_SHRINK = 0x0002
_F_SEAL_GROW = 0x0004
_F_SEAL_WRITE = 0x0008
_SEALS = _F_SEAL_SEAL | _F_SEAL_SHRINK | _F_SEAL_GROW | _F_SEAL_WRITE
_MFD_FLAGS = getattr(os, 'MFD_CLOEXEC', 1) | getattr(os, 'MFD_ALLOW_SEALING', 2)
# Map every page at once: one system call instead of a page fault per 4 KiB.
_MAP_POPULATE = mmap.MAP_SHARED | getattr(mmap, 'MAP_POPULATE', 0)
# Before Python 3.13 every mmap keeps a duplicate of its descriptor open, so
# each live view of received memory costs the receiver one descriptor.
_UNTRACKED: dict[str, bool] = {'trackfd': False} if sys.version_info >= (3, 13) else {}


@dataclasses.dataclass(frozen=True)
class SharedMemoryOptions:
    """How large messages travel on the fast lane between two vyra_base_ipc
    ends. Pass ``shared_memory=None`` to a server or client to keep every
    message inline.

    :param threshold: messages of more than this many serialized bytes go
        through shared memory; smaller ones inline.
    :param max_bytes: largest :class:`SharedBuffer` accepted. (Messages are
        held to ``max_message_bytes`` however they travel, as on the gRPC lane.)
    :raises TypeError, ValueError: not non-negative ints, ``max_bytes`` not
        above ``threshold``.
    """

    threshold: int = DEFAULT_SHARED_MEMORY_THRESHOLD
    max_bytes: int = DEFAULT_MAX_SHARED_MEMORY_BYTES

    def __post_init__(self) -> None:
        for name in ('threshold', 'max_bytes'):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f'SharedMemoryOptions.{name} must be an int, not {type(value).__name__}')
            if value < 0:
                raise ValueError(f'SharedMemoryOptions.{name} must be >= 0, not {value}')
        if self.max_bytes <= self.threshold:
            raise ValueError(f'SharedMemoryOptions.max_bytes ({self.max_bytes}) must be larger than '
                             f'the threshold ({self.threshold})')


def usable_options(options: SharedMemoryOptions | None) -> SharedMemoryOptions | None:
    """``options`` if shared memory can be used in this process, else
    ``None`` (with a warning, once per process, saying why).

    :raises TypeError: ``options`` is neither :class:`SharedMemoryOptions` nor ``None``.
    """
    if options is None:
        return None
    if not isinstance(options, SharedMemoryOptions):
        raise TypeError(f'shared_memory must be a SharedMemoryOptions or None, '
                        f'not {type(options).__name__}')
    reason = shared_memory_unavailable()
    if reason is None:
        return options
    if not _warned:
        _warned.append(True)
        warnings.warn(f'large messages travel inline: shared memory is unavailable ({reason})',
                      RuntimeWarning, stacklevel=3)
    return None


_warned: list[bool] = []


class SharedMemoryError(Exception):
    """Raised when a shared-memory buffer cannot be created, or a received
    one is refused (missing, not sealed, wrong size, not a memfd). The
    message names the buffer and what was wrong."""


class TooLargeError(SharedMemoryError):
    """Raised when a received message or buffer in shared memory is larger
    than the receiver accepts (answered RESOURCE_EXHAUSTED, like an inline one)."""


_availability: list[str | None] = []
_availability_lock = threading.Lock()


def shared_memory_unavailable() -> str | None:
    """Why shared memory cannot be used in this process, or ``None`` if it
    can (Linux with ``memfd_create`` and file sealing). Checked once."""
    with _availability_lock:
        if not _availability:
            _availability.append(_probe())
        return _availability[0]


def _probe() -> str | None:
    if not hasattr(os, 'memfd_create'):
        return 'os.memfd_create is not available on this platform'
    try:
        fd = os.memfd_create('vyra-ipc-probe', _MFD_FLAGS)
    except OSError as error:
        return f'memfd_create failed: {error.strerror}'
    try:
        fcntl.fcntl(fd, _F_ADD_SEALS, _SEALS)
    except OSError as error:
        return f'memfd sealing failed: {error.strerror}'
    finally:
        os.close(fd)
    return None


def seal_bytes(data: Any, name: str = 'vyra-ipc') -> int:
    """Return a new memfd holding a copy of ``data`` (any buffer), sealed
    against writes, shrinking and growing. The caller owns the descriptor.

    :raises SharedMemoryError: the memfd cannot be created or filled.
    """
    view = memoryview(data).cast('B')
    try:
        fd = os.memfd_create(name, _MFD_FLAGS)
    except OSError as error:
        raise SharedMemoryError(f'cannot create shared memory: {error.strerror}') from None
    try:
        # write() fills the memfd's pages in the kernel: no mapping (which
        # would block the write seal) and no page faults in this process.
        written = 0
        size = len(view)
        while written < size:
            written += os.write(fd, view[written:])
        fcntl.fcntl(fd, _F_ADD_SEALS, _SEALS)
    except OSError as error:
        os.close(fd)
        raise SharedMemoryError(f'cannot fill {len(view)} bytes of shared memory: '
                                f'{error.strerror}') from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def map_sealed(fd: int, size: int, what: str, populate: bool = True) -> memoryview:
    """Map a received memfd read-only after checking that it is what the
    sender announced: a memfd sealed against writes, shrinking and growing,
    exactly ``size`` bytes long. Does not close ``fd``; the mapping stays
    valid after it is closed and is unmapped when the view is released.

    :param what: names the buffer in errors, e.g. ``'the request'``.
    :param populate: map every page now (for a message about to be parsed
        whole); otherwise pages are mapped as they are first read.
    :raises SharedMemoryError: the descriptor is refused; nothing is mapped.
    """
    try:
        seals = fcntl.fcntl(fd, _F_GET_SEALS)
    except OSError as error:
        raise SharedMemoryError(f'{what}: the descriptor is not a sealable memfd '
                                f'({error.strerror})') from None
    missing = ~seals & (_F_SEAL_SHRINK | _F_SEAL_GROW | _F_SEAL_WRITE)
    if missing:
        names = [name for bit, name in ((_F_SEAL_SHRINK, 'shrink'), (_F_SEAL_GROW, 'grow'),
                                        (_F_SEAL_WRITE, 'write')) if missing & bit]
        raise SharedMemoryError(f'{what}: the memfd is not sealed against {", ".join(names)}')
    status = os.fstat(fd)
    if not stat.S_ISREG(status.st_mode) or status.st_size != size:
        raise SharedMemoryError(f'{what}: the memfd holds {status.st_size} bytes, '
                                f'{size} were announced')
    if size == 0:
        return memoryview(b'')
    try:
        mapping = mmap.mmap(fd, size, flags=_MAP_POPULATE if populate else mmap.MAP_SHARED,
                            prot=mmap.PROT_READ, **_UNTRACKED)
    except OSError as error:
        raise SharedMemoryError(f'{what}: cannot map {size} bytes: {error.strerror}') from None
    return memoryview(mapping).toreadonly()


def close_fds(fds: Iterable[int]) -> None:
    """Close descriptors, ignoring those already closed."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class SharedBuffer:
    """Bytes in sealed shared memory, handed to the other process by
    reference instead of being copied through the socket.

    Create one with :meth:`copy_from` (the one copy), put :attr:`ref` in a
    ``vyra.ipc.SharedBufferRef`` field of a request, and pass the buffer with
    the call::

        frame = SharedBuffer.copy_from(image)        # bytes, memoryview, ndarray
        request = DetectRequest(image=frame.ref)
        await ipc.call_method('Detect', request, buffers=[frame])

    The contents can never change (the memfd is sealed), so one buffer may be
    sent any number of times, to any number of calls, concurrently. Close it
    (or use ``with``) when no more calls will send it; receivers keep their
    mappings independently of that. Thread-safe.
    """

    __slots__ = ('_fd', '_size', '_handle', '_ref', '__weakref__')

    def __init__(self, fd: int, size: int) -> None:
        """Take ownership of ``fd``, a sealed memfd of ``size`` bytes (use
        :meth:`copy_from` to make one)."""
        self._fd = fd
        self._size = size
        self._handle = secrets.randbits(64)
        self._ref = SharedBufferRef(handle=self._handle, size=size)

    @classmethod
    def copy_from(cls, data: Any) -> 'SharedBuffer':
        """Copy ``data`` (anything with the buffer protocol: bytes, bytearray,
        memoryview, a C-contiguous NumPy array) into new sealed shared memory.

        :raises TypeError: ``data`` does not expose a buffer.
        :raises ValueError: ``data`` is not contiguous.
        :raises SharedMemoryError: shared memory is unavailable here.
        """
        view = memoryview(data)
        if not view.contiguous:
            raise ValueError('SharedBuffer.copy_from() needs a contiguous buffer '
                             '(for NumPy: numpy.ascontiguousarray())')
        reason = shared_memory_unavailable()
        if reason is not None:
            raise SharedMemoryError(f'shared memory is not available: {reason}')
        return cls(seal_bytes(view, 'vyra-ipc-buffer'), view.nbytes)

    @property
    def size(self) -> int:
        """Length in bytes."""
        return self._size

    @property
    def handle(self) -> int:
        """A random 64-bit number naming this buffer in :attr:`ref`."""
        return self._handle

    @property
    def ref(self) -> Any:
        """A ``vyra.ipc.SharedBufferRef`` naming this buffer (a new message
        each time, for assignment into a request)."""
        ref = SharedBufferRef()
        ref.CopyFrom(self._ref)
        return ref

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def fileno(self) -> int:
        """The memfd (owned by this object).

        :raises ValueError: the buffer is closed.
        """
        if self._fd < 0:
            raise ValueError('the SharedBuffer is closed')
        return self._fd

    def dup(self) -> int:
        """A new descriptor of the memfd for sending; the caller owns it."""
        return os.dup(self.fileno())

    def read(self) -> bytes:
        """A copy of the contents (for checks and tests)."""
        return os.pread(self.fileno(), self._size, 0) if self._size else b''

    def close(self) -> None:
        """Close this process's descriptor; idempotent. Copies already sent
        stay valid for their receivers."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> 'SharedBuffer':
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        if getattr(self, '_fd', -1) >= 0:
            _warn(f'unclosed SharedBuffer of {self._size} bytes', ResourceWarning, source=self)
            self.close()

    def __repr__(self) -> str:
        return f'<SharedBuffer {self._size} bytes handle={self._handle:#018x}{" closed" if self.closed else ""}>'


class ReceivedBuffers:
    """The explicit buffers that arrived with one message, by handle;
    read-only views of the sender's memory."""

    __slots__ = ('_views',)

    def __init__(self, views: dict[int, memoryview]) -> None:
        self._views = views

    def __len__(self) -> int:
        return len(self._views)

    def view(self, ref: Any) -> memoryview:
        """The buffer ``ref`` (a ``vyra.ipc.SharedBufferRef``) names.

        :raises SharedMemoryError: no buffer of that handle and size came with the message.
        """
        view = self._views.get(ref.handle)
        if view is None or len(view) != ref.size:
            raise SharedMemoryError(
                f'the message refers to shared buffer {ref.handle:#018x} ({ref.size} bytes), '
                'which was not sent with it (pass it in buffers=)')
        return view


_NO_BUFFERS = ReceivedBuffers({})


def shared_buffer(ref: Any, context: Any = None) -> memoryview:
    """A read-only view of the buffer a ``vyra.ipc.SharedBufferRef`` names,
    for a handler (``shared_buffer(request.image, context)``).

    On the fast lane the view maps the sender's shared memory: no copy is
    made, and it stays valid as long as the view is referenced. Where the
    buffer travelled inline (the gRPC lane, or a peer without shared memory),
    it is a view of ``ref.inline_data``. For a NumPy array:
    ``numpy.frombuffer(shared_buffer(ref, context), dtype)`` (read-only).

    :param context: the handler's context (gives the buffers of this call).
    :raises SharedMemoryError: the buffer was not sent with the call.
    """
    if ref.inline_data or ref.size == 0:
        return memoryview(ref.inline_data).toreadonly()
    buffers = getattr(context, '_buffers', None) or _NO_BUFFERS
    return buffers.view(ref)


# -- the wire side: frames with descriptors -----------------------------------------------------

def pack(payload: bytes, threshold: int, buffers: Sequence[SharedBuffer] = ()
         ) -> tuple[bytes, list[int]] | None:
    """The manifest and descriptors that replace ``payload`` in a frame, or
    ``None`` if it goes inline as it is (not above ``threshold``, no buffers).

    The caller owns the returned descriptors (passes them with the frame,
    then closes them).

    :raises SharedMemoryError: shared memory could not be created.
    """
    size = len(payload)
    if size <= threshold and not buffers:
        return None
    fds: list[int] = []
    try:
        manifest = Manifest()
        if size > threshold:
            fds.append(seal_bytes(payload))
            manifest.payload_size = size
        else:
            manifest.payload = payload
        for buffer in buffers:
            fds.append(buffer.dup())
            manifest.buffers.add(handle=buffer.handle, size=buffer.size)
    except BaseException:
        close_fds(fds)
        raise
    return manifest.SerializeToString(), fds


def unpack(data: bytes, take_fds: Callable[[int], list[int]], message_limit: int, buffer_limit: int,
           what: str) -> tuple[bytes | memoryview, ReceivedBuffers | None]:
    """Resolve a received manifest: the message payload (a read-only view of
    shared memory, or bytes) and the explicit buffers (``None`` if none).

    ``take_fds(n)`` returns the frame's ``n`` descriptors (or raises
    :class:`SharedMemoryError` if fewer arrived); they are closed here
    whatever happens; mappings live on in the returned views.

    :param message_limit: largest message accepted, in bytes.
    :param buffer_limit: largest explicit buffer accepted, in bytes.
    :param what: names the message in errors, e.g. ``'the request of /pkg.Service/Method'``.
    :raises TooLargeError: the message or a buffer is over its limit.
    :raises SharedMemoryError: malformed manifest, or a buffer that fails the
        checks of :func:`map_sealed`.
    """
    try:
        manifest = Manifest.FromString(data)
    except Exception as error:  # DecodeError
        raise SharedMemoryError(f'{what}: malformed shared-memory manifest: {error}') from None
    payload_size = manifest.payload_size
    count = (1 if payload_size else 0) + len(manifest.buffers)
    fds = take_fds(count) if count else []
    try:
        payload: bytes | memoryview
        position = 0
        if payload_size:
            if payload_size > message_limit:
                raise TooLargeError(f'Received message larger than max ({payload_size} vs. '
                                    f'{message_limit})')
            payload = map_sealed(fds[0], payload_size, what)
            position = 1
        else:
            payload = manifest.payload
        if not manifest.buffers:
            return payload, None
        views: dict[int, memoryview] = {}
        for index, buffer in enumerate(manifest.buffers):
            name = f'{what}, shared buffer {index} ({buffer.handle:#018x})'
            if buffer.size > buffer_limit:
                raise TooLargeError(f'{name}: {buffer.size} bytes is more than the limit of '
                                    f'{buffer_limit} (SharedMemoryOptions.max_bytes)')
            views[buffer.handle] = map_sealed(fds[position + index], buffer.size, name, populate=False)
        return payload, ReceivedBuffers(views)
    finally:
        close_fds(fds)


def check_buffers(path: str, request_streaming: bool, buffers: Sequence[SharedBuffer]) -> None:
    """Check the ``buffers=`` of a call of method ``path``.

    :raises TypeError: the method streams its requests, or an item is not a
        :class:`SharedBuffer`.
    :raises ValueError: a buffer is closed, or more than
        :data:`MAX_BUFFERS_PER_MESSAGE` of them.
    """
    if request_streaming:
        raise TypeError(f'{path} streams its requests: buffers= needs a unary request')
    if len(buffers) > MAX_BUFFERS_PER_MESSAGE:
        raise ValueError(f'{path}: {len(buffers)} buffers in one call; at most '
                         f'{MAX_BUFFERS_PER_MESSAGE} (put more data into fewer SharedBuffers)')
    for buffer in buffers:
        if not isinstance(buffer, SharedBuffer):
            raise TypeError(f'buffers must be SharedBuffer objects, not {type(buffer).__name__}')
        if buffer.closed:
            raise ValueError(f'{buffer!r} is closed')


def inline_buffers(message: Any, buffers: Sequence[SharedBuffer]) -> Any:
    """A copy of ``message`` whose ``SharedBufferRef`` fields naming one of
    ``buffers`` carry its bytes in ``inline_data``: how explicit buffers
    travel where descriptors cannot (the gRPC lane, a peer without shared
    memory). ``message`` itself is not changed.
    """
    by_handle = {buffer.handle: buffer for buffer in buffers}
    copy = type(message)()
    copy.CopyFrom(message)
    _fill_inline(copy, by_handle)
    return copy


def _is_repeated(field: Any) -> bool:
    # protobuf 7 dropped FieldDescriptor.label for is_repeated.
    repeated = getattr(field, 'is_repeated', None)
    return bool(repeated) if repeated is not None else field.label == field.LABEL_REPEATED


def _fill_inline(message: Any, by_handle: dict[int, SharedBuffer]) -> None:
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            values = value.values() if field.message_type.fields_by_name['value'].message_type else ()
        elif _is_repeated(field):
            values = value
        else:
            values = (value,)
        for item in values:
            if item.DESCRIPTOR.full_name == SharedBufferRef.DESCRIPTOR.full_name:
                buffer = by_handle.get(item.handle)
                if buffer is not None and not item.inline_data:
                    item.inline_data = buffer.read()
            else:
                _fill_inline(item, by_handle)
