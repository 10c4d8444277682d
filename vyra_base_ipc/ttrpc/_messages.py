"""The ttrpc envelope messages (``Request``, ``Response``, ``Status``) and the
conversions between them and gRPC's notions of status and metadata.

The messages are generated from ``protos/vyra_base_ipc/ttrpc.proto``, whose
field numbers are containerd's; their upb implementation encodes and decodes
a small envelope in well under a microsecond.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Iterable, Sequence

import grpc

from .. import ttrpc_pb2
from .._metadata import check_key, check_text
from ._frames import HEADER, MessageType

__all__ = [
    'ENVELOPE_ALLOWANCE',
    'Metadata',
    'checked_metadata',
    'Request',
    'Response',
    'Status',
    'code_of',
    'decode_response',
    'encode_ok_response',
    'encode_request',
    'encode_response',
    'has_more_fields',
    'metadata_from_wire',
    'metadata_to_wire',
    'ok_payload',
    'ok_response_frame',
    'request_parts',
    'request_prefix',
    'request_payload_size',
    'varint',
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


# Keys gRPC keeps for itself: those of its protocol ("grpc-": status,
# timeout, encodings, tracing; the rest reserved for its future use), HTTP/2's
# pseudo-headers (":path") and the headers its transport sets. A client
# refuses them all; a server drops from a request those a gRPC server never
# lets a handler see with the peer's value (see metadata_from_wire).
_RESERVED_PREFIXES = ('grpc-', ':')
_RESERVED_KEYS = frozenset({'content-type', 'te', 'user-agent', 'host'})
_TRANSPORT_KEYS = frozenset({'content-type', 'te'})


def checked_metadata(metadata: Metadata) -> list[tuple[str, str | bytes]]:
    """``metadata`` as both lanes send it, checked as gRPC checks it: keys
    lower-case (``X-Trace`` is sent as ``x-trace``) of 0-9, a-z, ``_``,
    ``-`` and ``.``; values of ``-bin`` keys bytes (a str is UTF-8 encoded),
    other values printable ASCII. Keys gRPC keeps for itself are refused:
    those beginning with ``grpc-`` or ``:``, and ``content-type``, ``te``,
    ``user-agent`` and ``host`` (the gRPC lane would drop them or act on them,
    ``grpc-status`` on the call's status, where the fast lane delivered them).

    :raises TypeError: not (key, value) pairs, a key not a str, or a value of
        the wrong type for its key.
    :raises ValueError: a key or value gRPC does not allow, or a reserved
        key; the message names it.
    """
    items: list[tuple[str, str | bytes]] = []
    for item in metadata:
        if isinstance(item, (str, bytes)) or not isinstance(item, Sequence) or len(item) != 2:
            raise TypeError(f'metadata items must be (key, value) pairs, not {item!r}')
        key, value = item
        if not isinstance(key, str):
            raise TypeError(f'metadata key must be a str, not {type(key).__name__}: {key!r}')
        key = key.lower()
        if key.startswith(_RESERVED_PREFIXES) or key in _RESERVED_KEYS:
            raise ValueError(f'metadata key {key!r} is reserved: gRPC keeps keys beginning with "grpc-" or '
                             '":", and content-type, te, user-agent and host for itself')
        check_key(key)
        if key.endswith('-bin'):
            if isinstance(value, str):
                value = value.encode()
            if not isinstance(value, (bytes, bytearray, memoryview)):
                raise TypeError(f'metadata value of {key!r} must be bytes, not {type(value).__name__}')
            value = bytes(value)
        elif not isinstance(value, str):
            raise TypeError(
                f'metadata value of {key!r} must be a str (only keys ending in "-bin" carry bytes), '
                f'not {type(value).__name__}')
        else:
            check_text(key, value)
        items.append((key, value))
    return items


def metadata_to_wire(metadata: Metadata | None) -> list[ttrpc_pb2.KeyValue]:
    """Convert gRPC-style metadata (:func:`checked_metadata`) to ttrpc
    ``KeyValue`` items. Values of ``-bin`` keys travel base64-encoded (as on
    gRPC's own wire), since ttrpc values are proto3 strings.

    :raises TypeError, ValueError: as :func:`checked_metadata`.
    """
    if not metadata:
        return []
    return [KeyValue(key=key, value=base64.b64encode(value).decode('ascii') if isinstance(value, bytes)
                     else value) for key, value in checked_metadata(metadata)]


def metadata_from_wire(items: Iterable[ttrpc_pb2.KeyValue]) -> tuple[tuple[str, str | bytes], ...]:
    """Convert received ``KeyValue`` items back to gRPC-style metadata.

    ``-bin`` values are base64-decoded; a value that is not base64 (from a
    peer that sent raw text) is passed on as its UTF-8 bytes. Keys gRPC's
    transport keeps for itself are dropped, in any case: those beginning
    with ``grpc-`` or ``:``, ``content-type`` and ``te``. This package's
    clients never send them (:func:`checked_metadata`); a raw peer's would
    reach a handler on this lane only, which a gRPC server never shows with
    the peer's value (it takes ``grpc-timeout`` as the deadline, and so on).
    (A gRPC server does pass on a ``grpc-`` key it does not know, reserved for
    its future use: no handler may rely on one.) ``user-agent`` and ``host``
    are kept, as a gRPC server keeps them (its ``user-agent`` is the one the
    peer's grpc library sends).

    :raises ValueError: a key gRPC does not allow (upper-case, empty, other
        characters than 0-9, a-z, ``_``, ``-`` and ``.``), in grpc's words:
        the call fails INTERNAL, as grpc fails it (this package's clients
        never send one).
    """
    result: list[tuple[str, str | bytes]] = []
    for item in items:
        key = item.key
        lowered = key.lower()
        if lowered.startswith(_RESERVED_PREFIXES) or lowered in _TRANSPORT_KEYS:
            continue
        try:
            check_key(key)
        except ValueError:
            raise ValueError(f'Illegal header key: {key}') from None
        if key.endswith('-bin'):
            try:
                result.append((key, base64.b64decode(item.value, validate=True)))
            except (binascii.Error, ValueError):
                result.append((key, item.value.encode()))
        else:
            result.append((key, item.value))
    return tuple(result)


_SMALL_VARINTS = tuple(bytes((value,)) for value in range(0x80))


def varint(value: int) -> bytes:
    """A non-negative int as a protobuf varint."""
    if value < 0x80:
        return _SMALL_VARINTS[value]
    if 0x10000000 <= value < 0x800000000:  # five bytes: a timeout of 0.27 to 34 s in ns
        return bytes(((value & 0x7F) | 0x80, (value >> 7 & 0x7F) | 0x80, (value >> 14 & 0x7F) | 0x80,
                      (value >> 21 & 0x7F) | 0x80, value >> 28))
    encoded = bytearray()
    while value > 0x7F:
        encoded.append((value & 0x7F) | 0x80)
        value >>= 7
    encoded.append(value)
    return bytes(encoded)


def request_prefix(service: str, method: str) -> bytes:
    """The first bytes of every ``Request`` to ``service``/``method``
    (fields 1 and 2): encoded once per method, not once per call."""
    return Request(service=service, method=method).SerializeToString()


# Tags of Request's fields 3 (payload: bytes) and 4 (timeout_nano: varint).
_PAYLOAD_FIELD = b'\x1a'
_TIMEOUT_FIELD = b'\x20'


def request_parts(prefix: bytes, payload: bytes, timeout_nano: int = 0,
                  metadata: Sequence[ttrpc_pb2.KeyValue] = ()) -> list[bytes]:
    """A serialized ``Request`` as the pieces to join (``metadata`` already
    in wire form), byte for byte what protobuf encodes: fields in order,
    defaults left out.

    Encoded by hand because a call's envelope is its ``prefix``
    (:func:`request_prefix`) and a few bytes around the payload: making a
    ``Request`` object and serializing it costs more than the rest of the
    encoding, and joining the pieces behind the frame header copies the
    payload once.
    """
    parts = [prefix]
    if payload:
        parts += (_PAYLOAD_FIELD, varint(len(payload)), payload)
    if timeout_nano > 0:
        parts += (_TIMEOUT_FIELD, varint(timeout_nano))
    elif timeout_nano:  # negative: the ten-byte two's complement, as protobuf has it
        parts.append(Request(timeout_nano=timeout_nano).SerializeToString())
    if metadata:
        entries = Request()
        entries.metadata.extend(metadata)
        parts.append(entries.SerializeToString())
    return parts


def encode_request(service: str, method: str, payload: bytes, timeout_nano: int = 0,
                   metadata: Sequence[ttrpc_pb2.KeyValue] = ()) -> bytes:
    """Serialize a ``Request`` (``metadata`` already in wire form)."""
    return b''.join(request_parts(request_prefix(service, method), payload, timeout_nano, metadata))


def encode_response(code: int, message: str = '', payload: bytes = b'', details: Sequence[Any] = ()) -> bytes:
    """Serialize a ``Response``. The status is always present (even when OK):
    older ttrpc clients treat a missing status as an error. ``details``: the
    status's ``google.protobuf.Any`` details (gRPC's richer error model)."""
    return Response(status=Status(code=code, message=message, details=details),
                    payload=payload).SerializeToString()


# A Response with an empty OK status (field 1, length 0) and the payload as
# field 2, encoded by hand: the hot path of every successful unary call.
_OK_STATUS = b'\x0a\x00'
_PAYLOAD_TAG = b'\x12'
_OK_PAYLOAD = _OK_STATUS + _PAYLOAD_TAG


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


_RESPONSE = int(MessageType.RESPONSE)


def ok_response_frame(stream_id: int, flags: int, payload: bytes) -> bytes:
    """The RESPONSE frame of an OK answer: byte for byte ``encode_frame(stream_id,
    RESPONSE, flags, encode_ok_response(payload))``, with the payload copied
    once rather than twice."""
    if not payload:
        return HEADER.pack(len(_OK_STATUS), stream_id, _RESPONSE, flags) + _OK_STATUS
    size = len(payload)
    if size < 0x80:  # a one-byte length: the small answers this path is for
        return b''.join((HEADER.pack(len(_OK_PAYLOAD) + 1 + size, stream_id, _RESPONSE, flags),
                         _OK_PAYLOAD, _SMALL_VARINTS[size], payload))
    length = varint(size)
    return b''.join((HEADER.pack(len(_OK_PAYLOAD) + len(length) + size, stream_id, _RESPONSE, flags),
                     _OK_PAYLOAD, length, payload))


def ok_payload_size(length: int) -> int | None:
    """The size of the payload a ``Response`` of ``length`` bytes carries if
    :func:`encode_ok_response` encoded it (as containerd's servers do too);
    ``None`` if no payload gives that length. For a frame skipped unread."""
    for digits in range(1, 11):
        size = length - len(_OK_PAYLOAD) - digits
        if size >= 0 and len(varint(size)) == digits:
            return size
    return None


def ok_payload(data: bytes) -> bytes | None:
    """The payload of a ``Response`` encoded as :func:`encode_ok_response`
    encodes an OK answer of less than 16 KiB; ``None`` for anything else
    (:func:`decode_response` reads those). Exact: a message that matches is
    an OK status and this payload and nothing more, so reading it by hand
    gives what protobuf would, without making a ``Response`` object."""
    if data[:3] == _OK_PAYLOAD:
        size = len(data) - 4  # the payload's size if its length takes one byte
        if size < 0x80:
            return data[4:] if size >= 0 and data[3] == size else None
        size -= 1  # two bytes
        if size < 0x4000 and data[3] == (size & 0x7F) | 0x80 and data[4] == size >> 7:
            return data[5:]
        return None
    return b'' if data == _OK_STATUS else None


def has_more_fields(data: bytes, most: int) -> bool:
    """Whether the message serialized in ``data`` has more than ``most``
    fields at its top level, counted without parsing it (False if it cannot
    be read within them: the parser then says what is wrong).

    Asked of large request envelopes before they are parsed: protobuf's
    runtime makes an object of every metadata entry before they can be
    counted, about 27 times its two bytes on the wire at the least (400 MiB
    for a 16 MiB frame of empty entries). The walk stops after ``most``
    fields, so it costs no more than the entries a request may carry.
    """
    position, end, fields = 0, len(data), 0
    while position < end:
        fields += 1
        if fields > most:
            return True
        key, position = _varint_at(data, position)
        wire_type = key & 7
        if position < 0 or wire_type in (3, 4, 6, 7):  # (groups: not in these messages)
            return False
        if wire_type == 0:
            _, position = _varint_at(data, position)
        elif wire_type == 2:
            length, position = _varint_at(data, position)
            if position < 0:
                return False
            position += length
        else:
            position += 8 if wire_type == 1 else 4
        if position < 0:
            return False
    return False


def request_payload_size(head: bytes, length: int) -> int | None:
    """The size of the message in a ``Request`` of ``length`` bytes whose
    serialization starts with ``head``, read from its payload field's length;
    ``None`` if ``head`` ends before that length, or holds what a ``Request``
    cannot (a payload longer than the rest of the ``length`` bytes, say: a
    peer's size that cannot be true is not reported as the message's).

    For a request frame skipped unread: the clients of this package write the
    fields in order, so the payload's length follows the service and method
    names, within the frame's first bytes (protobuf would take the last of
    several payload fields; these clients write one).
    """
    position, end = 0, len(head)
    while position < end:
        key, position = _varint_at(head, position)
        if position < 0 or key & 7 not in (0, 2):  # (Request has only varint and length-delimited fields)
            return None
        value, position = _varint_at(head, position)
        if position < 0:
            return None
        if key == 0x1A:  # field 3 (payload), length-delimited
            return value if value <= length - position else None
        if key & 7 == 2:
            position += value
    return None


def _varint_at(data: bytes, position: int) -> tuple[int, int]:
    """The varint at ``position`` and the position after it; (0, -1) if cut short or over 10 bytes."""
    value = shift = 0
    for index in range(position, min(position + 10, len(data))):
        byte = data[index]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, index + 1
        shift += 7
    return 0, -1


def decode_response(data: bytes) -> tuple[int, str, bytes, Sequence[Any]]:
    """Parse a ``Response`` into (status code number, message, payload,
    the status's ``google.protobuf.Any`` details).

    :raises google.protobuf.message.DecodeError: not a ``Response``.
    """
    response = Response.FromString(data)
    status = response.status
    return status.code, status.message, response.payload, status.details
