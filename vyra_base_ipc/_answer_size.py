"""An answer larger than the server's ``max_message_bytes``, alike on both lanes.

A handler's answer (a unary response, a streamed message, a
``context.write()``) over the server's ``max_message_bytes`` ends its call
RESOURCE_EXHAUSTED, in grpc core's words ("SERVER: Sent message larger than
max (N vs. M)", which a plain grpc.aio server gives), followed by the method
and the setting they are about. Before, the gRPC lane left it to grpc core:
its client got those words alone, and the server's log only grpc.aio's ERROR
"ExecuteBatchError raised in core by servicer method [...]" with a traceback
of grpc's own code, which a client leaving mid-write logs too; the fast lane
logged nothing. Now each lane checks the size of the bytes it sends anyway,
for the module's methods and the tools' alike (the gRPC lane's handler
wrappers serialize the answers themselves: :mod:`vyra_base_ipc._grpc_observe`,
:mod:`vyra_base_ipc._tools`) and logs it once a method every 10 s
(:func:`~._log_limit.log_limited`: the size is chosen by what a peer asks).
"""

from __future__ import annotations

import logging

from ._log_limit import log_limited

__all__ = ['answer_too_large']

_logger = logging.getLogger(__name__)


def answer_too_large(method: str, size: int, limit: int) -> str:
    """Log that an answer of ``method`` is ``size`` bytes, over
    ``max_message_bytes`` (``limit``), limited; the details its call ends
    RESOURCE_EXHAUSTED with."""
    log_limited(_logger, logging.ERROR, ('answer too large', method),  # (one in 10 s a method)
                '%s: an answer of %d bytes is over max_message_bytes (%d); the call ends RESOURCE_EXHAUSTED',
                method, size, limit)
    return (f'SERVER: Sent message larger than max ({size} vs. {limit}): an answer of {method} over the '
            "server's max_message_bytes")
