"""The ttrpc envelope messages (``Request``, ``Response``, ``Status``) and the
conversions between them and gRPC's notions of status and metadata.

The messages are generated from ``protos/vyra_base_ipc/ttrpc.proto``, whose
field numbers are containerd's; their upb implementation encodes and decodes
a small envelope in well under a microsecond.
"""

from __future__ import annotations

import base64
import binascii
from typing import Iterable, Sequence

import grpc

from .. import ttrpc_pb2

__all__ = [
    'ENVELOPE_ALLOWANCE',
    'Metadata',
    'Request',
    'Response',
    'Status',
    'code_of',
    'decode_response',
    'encode_ok_response',
    'encode_request',
    'encode_response',
    'metadata_from_wire',
    'metadata_to_wire',
]

Request = ttrpc_pb2.Request
Response = ttrpc_pb2.Response
Status = ttrpc_pb2.Status
KeyValue = ttrpc_pb2.KeyValue

Metadata = Sequence[tuple[str, 'str | bytes']]

#: Room for the envelope (service and method names, metadata) on top of the
#: message size limit, so that a message gRPC accepts fits in a frame here too.
#: gRPC's own default limit on metadata is 8 KiB.
ENVELOPE_ALLOWANCE = 64 * 1024

_CODES: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


def code_of(number: int) -> grpc.StatusCode:
    """The :class:`grpc.StatusCode` of a status number; unknown numbers are UNKNOWN."""
    return _CODES.get(number, grpc.StatusCode.UNKNOWN)


def metadata_to_wire(metadata: Metadata | None) -> list[ttrpc_pb2.KeyValue]:
    """Convert gRPC-style metadata to ttrpc ``KeyValue`` items.

    Keys are sent lower-case, as gRPC requires. Values of ``-bin`` keys are
    bytes and travel base64-encoded (as on gRPC's own wire), since ttrpc
    values are proto3 strings.

    :raises TypeError: a key is not a str, or a value has the wrong type for
        its key.
    """
    if not metadata:
        return []
    items = []
    for item in metadata:
        if isinstance(item, (str, bytes)) or not isinstance(item, Sequence) or len(item) != 2:
            raise TypeError(f'metadata items must be (key, value) pairs, not {item!r}')
        key, value = item
        if not isinstance(key, str):
            raise TypeError(f'metadata key must be a str, not {type(key).__name__}: {key!r}')
        key = key.lower()
        if key.endswith('-bin'):
            if isinstance(value, str):
                value = value.encode()
            if not isinstance(value, (bytes, bytearray, memoryview)):
                raise TypeError(f'metadata value of {key!r} must be bytes, not {type(value).__name__}')
            text = base64.b64encode(bytes(value)).decode('ascii')
        elif isinstance(value, str):
            text = value
        else:
            raise TypeError(
                f'metadata value of {key!r} must be a str (only keys ending in "-bin" carry bytes), '
                f'not {type(value).__name__}')
        items.append(KeyValue(key=key, value=text))
    return items


def metadata_from_wire(items: Iterable[ttrpc_pb2.KeyValue]) -> tuple[tuple[str, str | bytes], ...]:
    """Convert received ``KeyValue`` items back to gRPC-style metadata.

    ``-bin`` values are base64-decoded; a value that is not base64 (from a
    peer that sent raw text) is passed on as its UTF-8 bytes.
    """
    result: list[tuple[str, str | bytes]] = []
    for item in items:
        key = item.key
        if key.endswith('-bin'):
            try:
                result.append((key, base64.b64decode(item.value, validate=True)))
            except (binascii.Error, ValueError):
                result.append((key, item.value.encode()))
        else:
            result.append((key, item.value))
    return tuple(result)


def encode_request(service: str, method: str, payload: bytes, timeout_nano: int = 0,
                   metadata: Sequence[ttrpc_pb2.KeyValue] = ()) -> bytes:
    """Serialize a ``Request`` (``metadata`` already in wire form)."""
    request = Request(service=service, method=method, payload=payload, timeout_nano=timeout_nano)
    if metadata:
        request.metadata.extend(metadata)
    return request.SerializeToString()


def encode_response(code: int, message: str = '', payload: bytes = b'') -> bytes:
    """Serialize a ``Response``. The status is always present (even when OK):
    older ttrpc clients treat a missing status as an error."""
    return Response(status=Status(code=code, message=message), payload=payload).SerializeToString()


# A Response with an empty OK status (field 1, length 0) and the payload as
# field 2, encoded by hand: the hot path of every successful unary call.
_OK_STATUS = b'\x0a\x00'
_PAYLOAD_TAG = b'\x12'


def encode_ok_response(payload: bytes) -> bytes:
    """Serialize ``Response{status: {code: 0}, payload}``, byte for byte what
    :func:`encode_response` gives for an OK status."""
    if not payload:
        return _OK_STATUS
    size = len(payload)
    if size < 0x80:
        return _OK_STATUS + _PAYLOAD_TAG + bytes((size,)) + payload
    length = bytearray()
    while size > 0x7F:
        length.append((size & 0x7F) | 0x80)
        size >>= 7
    length.append(size)
    return b''.join((_OK_STATUS, _PAYLOAD_TAG, length, payload))


def decode_response(data: bytes) -> tuple[int, str, bytes]:
    """Parse a ``Response`` into (status code number, message, payload).

    :raises google.protobuf.message.DecodeError: not a ``Response``.
    """
    response = Response.FromString(data)
    status = response.status
    return status.code, status.message, response.payload

