"""How buffers travel where descriptors cannot: their bytes copied into the
``inline_data`` of the ``vyra.ipc.SharedBufferRef`` fields naming them, and
what that copy weighs, computed without making it.

A walk over a message's fields, by their descriptors (cached per field):
separate from :mod:`._shared_buffer`, which holds the buffers themselves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from google.protobuf import message_factory

from . import shared_memory_pb2
from ._descriptors import is_repeated

if TYPE_CHECKING:
    from ._shared_buffer import SharedBuffer

__all__ = ['inline_buffers', 'inline_size', 'inline_size_over']

_REF = shared_memory_pb2.SharedBufferRef


def inline_buffers(message: Any, buffers: Sequence[SharedBuffer]) -> Any:
    """A copy of ``message`` whose ``SharedBufferRef`` fields naming one of
    ``buffers`` carry its bytes in ``inline_data``: how buffers travel where
    descriptors cannot. ``message`` itself is not changed; ``buffers`` are
    frozen, as sending them as descriptors freezes them.
    """
    by_handle = {buffer.handle: buffer for buffer in buffers}
    copy = type(message)()
    copy.CopyFrom(message)
    _fill_inline(copy, by_handle)
    for buffer in buffers:
        buffer.freeze()
    return copy


def inline_size(message: Any, buffers: Sequence[SharedBuffer]) -> int:
    """The serialized size of :func:`inline_buffers` ``(message, buffers)``,
    exactly, without copying the buffers: what the request weighs where
    descriptors cannot travel, and what ``max_message_bytes`` holds it to
    on either lane."""
    sizes = {buffer.handle: buffer.size for buffer in buffers}
    return message.ByteSize() + _growth(message, sizes)


def inline_size_over(message: Any, buffers: Sequence[SharedBuffer], limit: int) -> int | None:
    """:func:`inline_size` ``(message, buffers)`` if it is over ``limit``,
    else ``None``; without the walk over ``message``'s fields when a bound
    shows that it fits (:func:`_growth_bound`): the usual request with a
    buffer is far below any limit, and the walk cost more than the rest of
    the check."""
    size = message.ByteSize()
    if size + _growth_bound(size, buffers) <= limit:
        return None
    size += _growth(message, {buffer.handle: buffer.size for buffer in buffers})
    return size if size > limit else None


def _growth_bound(size: int, buffers: Sequence[SharedBuffer]) -> int:
    """At least :func:`_growth` of any message of ``size`` bytes, whatever
    fields refer to ``buffers``, and however often. Inlining adds to each
    reference to a buffer its bytes, their tag and their length (10 bytes at
    most); a reference takes 2 bytes of the message at least (its tag and
    length), 4 if the buffer's handle is not 0 (then written, tag and
    value). Each submessage (a reference, what holds one, a map entry)
    takes 2 bytes at least, and its length prefix grows by 9 at most."""
    most = 0
    for buffer in buffers:
        # References to this buffer, at most size // per_reference of them.
        per_reference = 4 if buffer.handle else 2
        most = max(most, size * (_INLINE_TAG + 10 + buffer.size) // per_reference)
    return most + 9 * (size // 2)


def _varint_bytes(value: int) -> int:
    # 7 bits a byte, at least one byte (for 0).
    return (value.bit_length() + 6) // 7 or 1


def _growth(message: Any, sizes: dict[int, int]) -> int:
    """How many bytes inlining the buffers of ``sizes`` adds to ``message``
    (each changed submessage grows, and so may its length prefix)."""
    growth = 0
    for field, value in message.ListFields():
        shape = _shape(field)
        if shape == _SCALAR:
            continue
        if shape == _MAP:
            entry_class = message_factory.GetMessageClass(field.message_type)
            for key, item in value.items():
                grows = _nested_growth(item, sizes)
                if grows:
                    # The value grows inside its entry, and the entry inside the message.
                    entry: Any = entry_class(key=key)
                    entry.value.CopyFrom(item)
                    growth += _prefixed(entry.ByteSize(), _prefixed(item.ByteSize(), grows))
            continue
        for item in (value if shape == _REPEATED else (value,)):
            grows = _nested_growth(item, sizes)
            if grows:
                growth += _prefixed(item.ByteSize(), grows)
    return growth


def _nested_growth(item: Any, sizes: dict[int, int]) -> int:
    """The growth of one submessage's own bytes (without its length prefix)."""
    if item.DESCRIPTOR.full_name != _REF_NAME:
        return _growth(item, sizes)
    size = sizes.get(item.handle, 0)
    if not size or item.inline_data:
        return 0
    return _INLINE_TAG + _varint_bytes(size) + size


def _prefixed(old_size: int, grows: int) -> int:
    """The growth of a length-prefixed submessage of ``old_size`` bytes that grows by ``grows``."""
    return grows + _varint_bytes(old_size + grows) - _varint_bytes(old_size)


#: The tag of SharedBufferRef.inline_data (length-delimited).
_INLINE_TAG = _varint_bytes(_REF.DESCRIPTOR.fields_by_name['inline_data'].number << 3 | 2)

#: SharedBufferRef's full name (types are told apart by it: a message may
#: come from another descriptor pool).
_REF_NAME = _REF.DESCRIPTOR.full_name

#: How a field holds submessages (see :func:`_shape`).
_SCALAR, _SINGLE, _REPEATED, _MAP = range(4)
#: The shape of the fields met, by descriptor (a field's never changes).
_SHAPES: dict[Any, int] = {}
#: Fields :data:`_SHAPES` remembers at most; it starts again when full.
#: Descriptors cannot be weakly referenced: a program that keeps making
#: descriptor pools (a plugin loader, a test suite) must not grow it for ever.
_SHAPES_MAX = 4096


def _shape(field: Any) -> int:
    """Whether ``field`` holds no submessage (:data:`_SCALAR`, also a map
    of scalars), one (:data:`_SINGLE`), a list of them (:data:`_REPEATED`)
    or a map with message values (:data:`_MAP`). Looked up once per field:
    asking the descriptor (its ``GetOptions()`` above all) cost more than
    the rest of the walk, on every request with buffers."""
    shape = _SHAPES.get(field)
    if shape is None:
        message_type = field.message_type
        if message_type is None:
            shape = _SCALAR
        elif message_type.GetOptions().map_entry:
            shape = _SCALAR if message_type.fields_by_name['value'].message_type is None else _MAP
        else:
            shape = _REPEATED if is_repeated(field) else _SINGLE
        if len(_SHAPES) >= _SHAPES_MAX:
            _SHAPES.clear()  # (each is found again when next met)
        _SHAPES[field] = shape
    return shape


def _fill_inline(message: Any, by_handle: dict[int, SharedBuffer]) -> None:
    for field, value in message.ListFields():
        shape = _shape(field)
        if shape == _SCALAR:
            continue
        for item in (value.values() if shape == _MAP else value if shape == _REPEATED else (value,)):
            if item.DESCRIPTOR.full_name == _REF_NAME:
                buffer = by_handle.get(item.handle)
                if buffer is not None and not item.inline_data:
                    item.inline_data = buffer.read()
            else:
                _fill_inline(item, by_handle)
