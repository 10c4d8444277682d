"""vyra_base_ipc: inter-process communication inside a VYRA module.

gRPC over Unix domain sockets between the processes of one module (a web
backend and the module's ROS 2 node, a worker and its frontend). Between
modules, use ROS 2.

Public surface::

    from vyra_base_ipc import IPCServer, IPCHandler, SyncIPCHandler, ModuleService
    from vyra_base_ipc import SharedBuffer, shared_buffer, attach_buffers   # zero-copy buffers
    vyra_base_ipc.run(server.serve())      # asyncio.run() on a loop that busy-polls before it sleeps
    vyra_base_ipc.keep_freed_memory()      # large messages reuse freed memory (glibc's mallopt)
    vyra_base_ipc.configure_shared_memory_pool(max_bytes=...)  # this process's shared-memory pool
    from vyra_base_ipc import IPCError, ...   # every exception, defined in vyra_base_ipc.exceptions
    from vyra_base_ipc import ServerInterceptor, ClientInterceptor, CallRejected  # see calls, refuse some
"""

import sys as _sys

if _sys.version_info < (3, 11):  # (colcon installs it without looking at setup.py's python_requires)
    raise ImportError(f'vyra_base_ipc needs Python 3.11 or newer; this is Python {_sys.version.split()[0]}')

from ._allocator import DEFAULT_KEEP_FREED_MEMORY, keep_freed_memory
from ._busy_poll import DEFAULT_BUSY_POLL
from ._event_loop import new_event_loop, run
from ._interceptors import ClientCall, ClientInterceptor, ServerCall, ServerInterceptor
from ._limits import ServerLimits
from ._options import DEFAULT_GRACE_PERIOD, DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_TIMEOUT
from ._payload import SharedMemoryOptions
from ._peer import PeerCredentials, peer_credentials
from ._pool_settings import configure_shared_memory_pool
from ._shared_buffer import (
    ReceivedBuffers,
    SharedBuffer,
    SharedBufferRef,
    attach_buffers,
    received_buffer,
    shared_buffer,
)
from .address import MAX_SOCKET_PATH_BYTES, default_socket_path, resolve_socket_path
from .client import IPCHandler, SyncIPCHandler
from .exceptions import (
    CallRejected,
    CommandError,
    ForkedProcessError,
    IPCError,
    IPCRemoteError,
    IPCTimeoutError,
    IPCUnavailableError,
    MessageTooLargeError,
    ParameterError,
    ServiceCallTimeout,
    ServiceUnavailable,
    SharedMemoryError,
    SocketInUseError,
    TooLargeError,
    UnsafeDirectoryError,
    UntrustedServerError,
)
from .module_service import ModuleService, command
from .server import IPCServer

__all__ = [
    'CallRejected',
    'ClientCall',
    'ClientInterceptor',
    'CommandError',
    'DEFAULT_BUSY_POLL',
    'DEFAULT_GRACE_PERIOD',
    'DEFAULT_KEEP_FREED_MEMORY',
    'DEFAULT_MAX_MESSAGE_BYTES',
    'DEFAULT_TIMEOUT',
    'ForkedProcessError',
    'IPCError',
    'IPCHandler',
    'IPCRemoteError',
    'IPCServer',
    'IPCTimeoutError',
    'IPCUnavailableError',
    'MAX_SOCKET_PATH_BYTES',
    'MessageTooLargeError',
    'ModuleService',
    'ParameterError',
    'PeerCredentials',
    'ReceivedBuffers',
    'ServerCall',
    'ServerInterceptor',
    'ServerLimits',
    'ServiceCallTimeout',
    'ServiceUnavailable',
    'SharedBuffer',
    'SharedBufferRef',
    'SharedMemoryError',
    'SharedMemoryOptions',
    'SocketInUseError',
    'SyncIPCHandler',
    'TooLargeError',
    'UnsafeDirectoryError',
    'UntrustedServerError',
    'attach_buffers',
    'command',
    'configure_shared_memory_pool',
    'default_socket_path',
    'keep_freed_memory',
    'new_event_loop',
    'peer_credentials',
    'received_buffer',
    'resolve_socket_path',
    'run',
    'shared_buffer',
]
