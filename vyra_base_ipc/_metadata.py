"""What gRPC allows in metadata, for the checks of both lanes: the client's
(:func:`vyra_base_ipc.ttrpc._messages.checked_metadata`) and a handler's
trailers (:func:`vyra_base_ipc._status_details.checked_trailer`)."""

from __future__ import annotations

import re

__all__ = ['KEY', 'TEXT']

#: A metadata key: lower-case 0-9, a-z, "_", "-" and ".".
KEY = re.compile(r'[0-9a-z_.-]+\Z')
#: A value of a key that does not end in "-bin": printable ASCII.
TEXT = re.compile(r'[\x20-\x7e]*\Z')
