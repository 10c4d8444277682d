"""``vyra_base.com.handler.ipc``: the documented import path of the VYRA IPC
handler, re-exporting :mod:`vyra_base_ipc`.

Shipped as a portion of the ``vyra_base`` namespace package (no
``__init__.py`` files). Where the upstream ``vyra_base`` package is installed,
its regular package takes precedence under Python's import rules; import from
``vyra_base_ipc`` there.
"""

from vyra_base_ipc import (
    CommandError,
    ForkedProcessError,
    IPCError,
    IPCHandler,
    IPCRemoteError,
    IPCServer,
    IPCTimeoutError,
    IPCUnavailableError,
    MessageTooLargeError,
    ParameterError,
    ReceivedBuffers,
    ServiceCallTimeout,
    ServiceUnavailable,
    SharedBuffer,
    SharedMemoryError,
    SharedMemoryOptions,
    SocketInUseError,
    SyncIPCHandler,
    TooLargeError,
    attach_buffers,
    received_buffer,
    shared_buffer,
)

__all__ = [
    'CommandError',
    'ForkedProcessError',
    'IPCError',
    'IPCHandler',
    'IPCRemoteError',
    'IPCServer',
    'IPCTimeoutError',
    'IPCUnavailableError',
    'MessageTooLargeError',
    'ParameterError',
    'ReceivedBuffers',
    'ServiceCallTimeout',
    'ServiceUnavailable',
    'SharedBuffer',
    'SharedMemoryError',
    'SharedMemoryOptions',
    'SocketInUseError',
    'SyncIPCHandler',
    'TooLargeError',
    'attach_buffers',
    'received_buffer',
    'shared_buffer',
]
