"""A gRPC channel that connects only to the socket file its client checked.

grpc connects by path, and again by path whenever a connection broke or a
call waits for the server (``wait_for_ready``, its reconnect backoff): to
whatever is at the path by then. The client checks the socket file before
every call (:func:`~vyra_base_ipc._peer.check_server_socket`), but in a
directory all may write, like ``/tmp``, another user could bind a socket at
the path between that check and grpc's connect, once the trusted server
removed its own (a restart).

So the channel's target is ``unix:/proc/self/fd/N`` instead, ``N`` an
``O_PATH`` descriptor of the socket file the check found trusted: the kernel
resolves it to that inode, so grpc reaches the server that bound it or
nobody (a socket another user bound at the path since is another inode).
When a trusted server's socket takes the path's place (a restart), the
check before the next call points ``N`` at the new inode (``dup2``: one
atomic step for grpc's threads, which may be connecting through ``N`` at
that moment). A call that waits for its server waits here, outside grpc,
until the path's socket listens (see :meth:`PinnedSocket.listening`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
import threading
from typing import Any, Callable, Sequence
import weakref

import grpc

from ._peer import check_server_socket, untrusted
from ._socket_file import FD_DIR, is_listening

__all__ = ['PinnedChannel', 'PinnedSocket']


class PinnedSocket:
    """The socket file at ``path`` as a descriptor pinned to a checked inode.

    Until :meth:`check` found a trusted socket file it is pinned to ``/``,
    which no connect reaches. Thread-safe; :meth:`close` is idempotent and
    runs at the latest when the channel it was made for is collected.

    :param path: the socket file.
    :param trusted: the uids whose socket files are trusted.
    """

    def __init__(self, path: str, trusted: frozenset[int]) -> None:
        self.path = path
        self._trusted = trusted
        self._lock = threading.Lock()
        self._pinned: tuple[int, int] | None = None
        # Without FD_DIR (no /proc: a rare container) grpc connects by path,
        # and the window above stays open.
        self._fd: int | None = os.open('/', os.O_PATH | os.O_CLOEXEC) if os.path.isdir(FD_DIR) else None
        #: What grpc connects to: the descriptor's name, or the path itself.
        self.address = path if self._fd is None else f'{FD_DIR}/{self._fd}'

    def check(self) -> bool:
        """Check the socket file (as :func:`check_server_socket` does) and
        pin the descriptor to it if it is not already; whether it is there.

        :raises UntrustedServerError: it, its directory or a link on the way
            to it is not a trusted user's.
        """
        found = check_server_socket(self.path, self._trusted)
        if found is None or self._fd is None or (found.st_dev, found.st_ino) == self._pinned:
            return found is not None
        try:
            fd = os.open(self.path, os.O_PATH | os.O_CLOEXEC)
        except FileNotFoundError:
            return False  # (removed since)
        try:
            # The inode the descriptor holds is checked, not the path again:
            # another socket may have taken the path since the stat above.
            opened = os.fstat(fd)
            if opened.st_uid not in self._trusted:
                raise untrusted('the socket file', self.path, opened.st_uid, self._trusted)
            with self._lock:
                if self._fd is not None:
                    os.dup2(fd, self._fd)
                    self._pinned = (opened.st_dev, opened.st_ino)
        finally:
            os.close(fd)
        return True

    def replaced(self) -> bool:
        """Whether the socket file the descriptor was pinned to is no longer
        at its path (removed, or another file there now); without a pinned
        descriptor, whether no file is there."""
        try:
            found = os.stat(self.path)
        except OSError:
            return True
        with self._lock:
            pinned = self._pinned
        return False if pinned is None else (found.st_dev, found.st_ino) != pinned

    def listening(self) -> bool:
        """Whether a server listens on the pinned socket (a socket file left
        by a server that died never listens again: a call that waits for
        its server then waits for the next one's file, see :meth:`check`)."""
        return is_listening(Path(self.address))

    def close(self) -> None:
        """Let go of the descriptor (its number may then name anything: only
        after the channel using it is closed or unreachable)."""
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


# Not frozen: close() sets _closed. Equal only to itself, as the channel it
# holds is (nothing compares or hashes these by value).
@dataclasses.dataclass(eq=False)
class PinnedChannel:
    """A gRPC channel (``grpc`` or ``grpc.aio``) and the socket it is pinned to."""

    channel: Any
    pin: PinnedSocket
    # Held while a blocking channel closes or makes a method's callable, which
    # grpc (1.85) does with a handle from the channel's core: on a channel
    # closed before or meanwhile (disconnect() in another thread), the
    # process died of SIGSEGV (test_client_stress.py). A grpc.aio channel
    # makes one after its close, and its call then fails.
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, init=False, repr=False)
    #: Whether close() closed the blocking channel; read and written under _lock only.
    _closed: bool = dataclasses.field(default=False, init=False, repr=False)

    @classmethod
    def open(cls, factory: Callable[..., Any], path: str, trusted: frozenset[int],
             options: Sequence[tuple[str, Any]]) -> PinnedChannel:
        """A channel made by ``factory`` (``grpc.insecure_channel`` or its
        ``grpc.aio`` twin), pinned to ``path``'s socket file as checked for ``trusted``."""
        pin = PinnedSocket(path, trusted)
        # Channels to one address share grpc's connections (its global
        # subchannel pool): a descriptor number used again by another pin
        # must not find this channel's connection.
        channel = factory(f'unix:{pin.address}', options=[*options, ('grpc.use_local_subchannel_pool', 1)])
        weakref.finalize(channel, pin.close)  # (a channel left to the garbage collector, see _pool)
        return cls(channel, pin)

    def is_ready(self) -> bool:
        """Whether the channel is connected (READY): to a live server, so a
        call that waits for its server need not check that one listens."""
        get_state = getattr(self.channel, 'get_state', None)  # (grpc.aio)
        if get_state is not None:
            return bool(get_state(False) is grpc.ChannelConnectivity.READY)
        # A blocking channel tells only subscribe()'s thread, which polls the
        # core's state (a number, the enum's first value); not there (another
        # grpc): not known to be ready.
        check = getattr(getattr(self.channel, '_channel', None), 'check_connectivity_state', None)
        return check is not None and check(False) == grpc.ChannelConnectivity.READY.value[0]

    def multi_callable(self, kind: str, method: str, request_serializer: Callable[[Any], bytes] | None,
                       response_deserializer: Callable[[bytes], Any] | None) -> Any:
        """The channel's callable of ``method``, a registered method of ``kind``
        (``'unary_unary'``, ``'unary_stream'``, ...); thread-safe.

        :raises ValueError: a blocking channel was closed (grpc's words for a
            call on a closed channel).
        """
        with self._lock:
            if self._closed:
                raise ValueError('Cannot invoke RPC on closed channel!')
            return getattr(self.channel, kind)(method, request_serializer=request_serializer,
                                               response_deserializer=response_deserializer,
                                               _registered_method=True)

    def close(self) -> None:
        """Close a blocking channel, then its descriptor. Waits for a callable
        being made (:meth:`multi_callable`) to be made."""
        with self._lock:
            self._closed = True
            self.channel.close()
        self.pin.close()

    async def aclose(self) -> None:
        """Close a grpc.aio channel, then its descriptor."""
        await self.channel.close()
        self.pin.close()
