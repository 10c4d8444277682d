"""What gRPC allows in metadata, in the words both lanes' checks give: the
client's (:func:`vyra_base_ipc.ttrpc._messages.checked_metadata`) and a
handler's trailers (:func:`vyra_base_ipc._status_details.checked_trailer`)."""

from __future__ import annotations

import re

__all__ = ['check_key', 'check_text']

#: A metadata key: lower-case 0-9, a-z, "_", "-" and ".".
_KEY = re.compile(r'[0-9a-z_.-]+\Z')
#: A value of a key that does not end in "-bin": printable ASCII.
_TEXT = re.compile(r'[\x20-\x7e]*\Z')


def check_key(key: str, what: str = 'metadata') -> None:
    """:raises ValueError: ``key`` has other characters than gRPC allows (naming it, as ``what``'s)."""
    if not _KEY.match(key):
        raise ValueError(f'{what} key {key!r}: gRPC allows only 0-9, a-z, "_", "-" and "." in a key')


def check_text(key: str, value: str, what: str = 'metadata') -> None:
    """:raises ValueError: ``value`` of ``key`` (not a ``-bin`` key) is not printable ASCII."""
    if not _TEXT.match(value):
        raise ValueError(f'{what} value of {key!r} must be printable ASCII (a key ending in "-bin" '
                         f'carries any bytes), not {value!r}')
