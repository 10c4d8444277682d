"""Defaults shared by servers and clients, and the gRPC options built from them."""

from __future__ import annotations

__all__ = [
    'DEFAULT_GRACE_PERIOD',
    'DEFAULT_MAX_MESSAGE_BYTES',
    'DEFAULT_TIMEOUT',
    'MAX_SECONDS',
    'channel_options',
    'server_options',
    'validate_count',
    'validate_grace',
    'validate_max_message_bytes',
    'validate_timeout',
]

#: Deadline of a call when none is given: no call may wait forever.
DEFAULT_TIMEOUT = 5.0
#: Largest message either side sends or accepts (gRPC's own default is 4 MiB).
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
#: Time in-flight calls get to finish when a server stops.
DEFAULT_GRACE_PERIOD = 5.0

# gRPC's default reconnect backoff (1 s, x1.6, up to 120 s) leaves a restarted
# local server unreachable for seconds; on a Unix socket a connect attempt
# costs microseconds, so retry fast and cap low. Not grpc.min_reconnect_backoff_ms:
# grpc core takes it as the time a connection attempt has to receive the
# server's HTTP/2 SETTINGS (default 20 s), and a busy server misses 100 ms:
# calls then failed UNAVAILABLE although the server was up.
_RECONNECT_BACKOFF = (
    ('grpc.initial_reconnect_backoff_ms', 100),
    ('grpc.max_reconnect_backoff_ms', 500),
)


def validate_count(value: object, name: str, kind: str = 'an int') -> int:
    """:raises TypeError, ValueError: unless ``value`` is an int from 1 to
    2**31-1 (grpc core's int); ``kind`` says what the TypeError asks for."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f'{name} must be {kind}, not {type(value).__name__}')
    if not 0 < value < 2**31:
        raise ValueError(f'{name} must be between 1 and {2**31 - 1}, not {value}')
    return value


def validate_max_message_bytes(value: object) -> int:
    """:raises TypeError, ValueError: unless ``value`` is a positive int below 2 GiB."""
    return validate_count(value, 'max_message_bytes')


#: The longest timeout or grace taken (31 years): a deadline beyond about
#: 9.2e9 s no longer fits grpc's 64-bit nanoseconds, nor the timeouts of
#: Python's threading.
MAX_SECONDS = 1e9


def validate_timeout(value: object, name: str = 'timeout') -> float:
    """:raises TypeError, ValueError: unless ``value`` is a number of seconds
    > 0 and at most :data:`MAX_SECONDS`."""
    return _seconds(value, name, zero=False)


def validate_grace(value: object, name: str = 'grace_period') -> float:
    """:raises TypeError, ValueError: unless ``value`` is a number of seconds
    >= 0 and at most :data:`MAX_SECONDS`."""
    return _seconds(value, name, zero=True)


def _seconds(value: object, name: str, zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f'{name} must be a number of seconds, not {type(value).__name__}')
    if not (0 <= value if zero else 0 < value) or not value <= MAX_SECONDS:
        raise ValueError(f'{name} must be a finite number of seconds {">=" if zero else ">"} 0 and at most '
                         f'{MAX_SECONDS:g}, not {value}')
    return float(value)


def _message_limits(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ('grpc.max_send_message_length', max_message_bytes),
        ('grpc.max_receive_message_length', max_message_bytes),
    ]


def _response_metadata_limits(max_message_bytes: int) -> list[tuple[str, int]]:
    # What a client channel takes of a server's headers and trailers: grpc
    # core's defaults (8 KiB soft, a random share of answers over it refused;
    # 16 KiB hard) failed a handler's status with details of 9 KB or more
    # RESOURCE_EXHAUSTED "received metadata size exceeds soft limit", while
    # the fast lane carries them whole in its response frame. The gRPC lane
    # takes them up to the fast lane's bound on that frame: max_message_bytes
    # and the envelope's allowance (in grpc core's C int). (A server's bound
    # on the metadata it takes in is ServerLimits.max_metadata_bytes.)
    from .ttrpc._messages import ENVELOPE_ALLOWANCE  # (not at the top: the fast lane imports this module)

    bound = min(max_message_bytes + ENVELOPE_ALLOWANCE, 2**31 - 1)
    return [('grpc.max_metadata_size', bound), ('grpc.absolute_max_metadata_size', bound)]


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> tuple[tuple[str, int], ...]:
    """Options of every client channel."""
    return (*_message_limits(max_message_bytes), *_response_metadata_limits(max_message_bytes),
            *_RECONNECT_BACKOFF)


def server_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> tuple[tuple[str, int], ...]:
    """Options of every server."""
    return tuple(_message_limits(max_message_bytes))
