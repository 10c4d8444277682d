"""The payloads every transport carries: the same bytes everywhere."""

from __future__ import annotations

__all__ = ['LARGE_PAYLOAD', 'PAYLOAD_SIZES', 'make_payload', 'size_label']

#: 64 B, 64 KiB, 1 MiB, 10 MiB.
PAYLOAD_SIZES = (64, 64 * 1024, 1024 * 1024, 10 * 1024 * 1024)
#: 100 MiB: above every message size limit; only shared memory carries it.
LARGE_PAYLOAD = 100 * 1024 * 1024

_PATTERN = b'vyra-ipc-bench-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'


def make_payload(size: int) -> bytes:
    """``size`` bytes of printable ASCII, so that a ROS 2 ``string`` can carry
    them unchanged.

    :raises ValueError: for a negative size.
    """
    if size < 0:
        raise ValueError(f'payload size must be >= 0, not {size}')
    repeats = size // len(_PATTERN) + 1
    return (_PATTERN * repeats)[:size]


def size_label(size: int) -> str:
    """``64 B``, ``64 KiB``, ``1 MiB``, ``10 MiB``."""
    for unit, factor in (('MiB', 2**20), ('KiB', 2**10)):
        if size >= factor and size % factor == 0:
            return f'{size // factor} {unit}'
    return f'{size} B'
