"""Large messages serialized in pieces: their large ``bytes`` fields set
apart, to be written straight into shared memory.

protobuf's Python runtime (upb) serializes a message only into new
``bytes``: it encodes the message into its arena, then copies that into the
``bytes`` object, which the fast lane copies into a shared-memory segment.
A message large because of its ``bytes`` fields (an image, a point cloud,
a file) need not take those copies. :func:`pieces` has protobuf serialize
the message without its large ``bytes`` fields (a few bytes), and puts each
of them after it as its key, its length and its value: the value is read
once out of the message (protobuf's getter, a copy) and written once into
the segment (:meth:`~vyra_base_ipc._payload.Pieces.write_into`). Singular
submessages holding such fields are split in turn, inside their own key and
length.

The receiver parses the same message from it: fields may come in any
order, and a singular field's last value wins (protobuf's encoding guide,
"Field Order"). Where pieces could say something else, the message is
serialized whole by protobuf: types that take extensions or have required
fields, and messages that hold unknown fields.

Pieces are made only in a process whose malloc keeps freed memory
(:func:`~vyra_base_ipc.keep_freed_memory`, which the ``ipc_server`` node
applies by default). With glibc's defaults, whether the blocks of a large
message stay in malloc's heap or go back to the kernel (to be faulted in
anew) turns on its dynamic thresholds, which the largest block freed sets,
and pieces make other blocks than protobuf's serialization. A client
echoing 2 to 14 MiB and reading each answer faulted in none of it per call
with protobuf's serialization and twice the message with pieces (10 MiB:
16 ms a call instead of 8); one that read no answer faulted in less with
pieces. Which blocks a call makes should not decide that.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Union

from google.protobuf import unknown_fields
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from .._allocator import keeps_freed_memory
from .._descriptors import is_repeated, is_required
from .._methods import CheckedSerializer
from .._payload import Pieces, SharedMemoryOptions
from ._messages import varint

__all__ = ['MIN_PIECE', 'pieces', 'serialized']

#: A ``bytes`` field is set apart from this many bytes up; a smaller one
#: costs less serialized with the rest.
MIN_PIECE = 1 << 16

# How a field that is not set apart is copied into the rest of the message.
_COPY = 0  # a scalar without presence: its value, whatever it is (-0.0 is not the default)
_IF_SET = 1  # a scalar with presence: its value if set
_MESSAGE = 2  # a submessage: copied if set
_EXTEND = 3  # a repeated field: its items
_MERGE = 4  # a map: its entries


@dataclasses.dataclass(frozen=True)
class _Plan:
    """How a message type is serialized in pieces (field names; keys encoded)."""

    #: Singular ``bytes`` fields: name, whether it has presence, key.
    values: tuple[tuple[str, bool, bytes], ...]
    #: Singular submessages whose type has a plan: name, key, the plan.
    nested: tuple[tuple[str, bytes, '_Plan'], ...]
    #: Every other field: name, how it is copied (:data:`_COPY` ...).
    rest: tuple[tuple[str, int], ...]


#: What :func:`_probe` found for one field of a plan: a ``bytes`` value (or
#: ``None``: not set), or a submessage, the bytes set apart in it and what
#: was found in it.
_Found = Union[bytes, None, tuple[Any, int, list[Any]]]

#: Plans by message class (``None``: serialized whole).
_PLANS: dict[type, _Plan | None] = {}
#: Classes :data:`_PLANS` remembers at most; it starts again when full (a
#: program that keeps making descriptor pools must not grow it for ever).
_PLANS_MAX = 1024


def serialized(serialize: Callable[[Any], bytes], message: Any, shared_memory: SharedMemoryOptions | None
               ) -> bytes | Pieces:
    """``serialize(message)``; in :func:`pieces`, if it has large ``bytes``
    fields, on a connection with ``shared_memory`` options (where large
    messages go into shared memory), in a process that keeps freed memory
    (see the module's docstring), where ``serialize`` is protobuf's
    serializer of the message's class (a
    :class:`~vyra_base_ipc._methods.CheckedSerializer` checks it first).

    :raises Exception: what ``serialize`` raises.
    """
    if shared_memory is None or not keeps_freed_memory():
        return serialize(message)
    if isinstance(serialize, CheckedSerializer):
        serialize.check(message)
        serialize = serialize.serialize
    if serialize is getattr(type(message), 'SerializeToString', None):
        split = pieces(message)
        if split is not None:
            return split
    return serialize(message)


def pieces(message: Any) -> Pieces | None:
    """``message`` serialized in pieces, if it has ``bytes`` fields of
    :data:`MIN_PIECE` bytes or more to set apart (``None``: serialize it
    whole). Once read out of the message, they go in pieces whatever their
    size: joined (if the message goes inline), they cost one copy less than
    protobuf's serialization.
    """
    cls = type(message)
    try:
        plan = _PLANS[cls]
    except KeyError:
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        descriptor = getattr(cls, 'DESCRIPTOR', None)  # (None: a class of the caller's own)
        plan = _PLANS[cls] = None if descriptor is None else _plan(descriptor, frozenset())
    if plan is None:
        return None
    total, found = _probe(message, plan)
    if not total:
        return None
    parts: list[bytes] = []
    size = _build(message, plan, found, parts)
    return None if size is None else Pieces(parts, size)


def _plan(descriptor: Descriptor, outer: frozenset[Descriptor]) -> _Plan | None:
    """The plan of a message type, ``None`` if it has no ``bytes`` field to
    set apart or may not be split. ``outer``: the types it is nested in
    (a type inside itself is copied whole there)."""
    if descriptor.extension_ranges:
        return None
    values: list[tuple[str, bool, bytes]] = []
    nested: list[tuple[str, bytes, _Plan]] = []
    rest: list[tuple[str, int]] = []
    for field in descriptor.fields:
        if is_required(field):
            return None  # (protobuf refuses to serialize it unset: the rest alone would pass)
        message_type = field.message_type
        key = varint(field.number << 3 | 2)  # (length-delimited: a bytes field's, a submessage's)
        if is_repeated(field):
            is_map = message_type is not None and message_type.GetOptions().map_entry
            rest.append((field.name, _MERGE if is_map else _EXTEND))
        elif field.type == FieldDescriptor.TYPE_BYTES:
            values.append((field.name, field.has_presence, key))
        elif field.type == FieldDescriptor.TYPE_MESSAGE and message_type is not None:  # (a group: no length)
            inner = None if message_type in outer else _plan(message_type, outer | {descriptor})
            if inner is None:
                rest.append((field.name, _MESSAGE))
            else:
                nested.append((field.name, key, inner))
        elif field.type == FieldDescriptor.TYPE_GROUP:
            rest.append((field.name, _MESSAGE))
        else:
            rest.append((field.name, _IF_SET if field.has_presence else _COPY))
    if not values and not nested:
        return None
    return _Plan(tuple(values), tuple(nested), tuple(rest))


def _probe(message: Any, plan: _Plan) -> tuple[int, list[_Found]]:
    """How many bytes the fields of ``plan`` in ``message`` would set apart,
    and what was read of them (each ``bytes`` value read once: reading one
    copies it)."""
    total = 0
    found: list[_Found] = []
    for name, presence, _ in plan.values:
        value = getattr(message, name) if not presence or message.HasField(name) else None
        if value is not None and len(value) >= MIN_PIECE:
            total += len(value)
        found.append(value)
    for name, _, inner in plan.nested:
        if message.HasField(name):
            submessage = getattr(message, name)
            inner_total, inner_found = _probe(submessage, inner)
            total += inner_total
            found.append((submessage, inner_total, inner_found))
        else:
            found.append(None)
    return total, found


def _build(message: Any, plan: _Plan, found: list[_Found], parts: list[bytes]) -> int | None:
    """Append the pieces of ``message`` to ``parts``; return their size
    (``None`` where the message holds unknown fields: serialize it whole)."""
    if len(unknown_fields.UnknownFieldSet(message)):
        return None
    rest = type(message)()
    for name, how in plan.rest:
        _copy(message, rest, name, how)
    apart: list[tuple[bytes, list[bytes], int]] = []  # key, pieces (a value, or a submessage's), size
    count = len(plan.values)
    for (name, _, key), value in zip(plan.values, found[:count], strict=True):
        if value is None:
            continue
        assert isinstance(value, bytes)
        if len(value) >= MIN_PIECE:
            apart.append((key, [value], len(value)))
        else:
            setattr(rest, name, value)
    for (name, key, inner), entry in zip(plan.nested, found[count:], strict=True):
        if entry is None:
            continue
        assert isinstance(entry, tuple)
        submessage, inner_total, inner_found = entry
        if inner_total:
            inner_parts: list[bytes] = []
            inner_size = _build(submessage, inner, inner_found, inner_parts)
            if inner_size is None:
                return None
            apart.append((key, inner_parts, inner_size))
        else:
            getattr(rest, name).CopyFrom(submessage)
    head = rest.SerializeToString()
    parts.append(head)
    size = len(head)
    for key, pieces_apart, length in apart:
        prefix = key + varint(length)
        parts.append(prefix)
        parts += pieces_apart
        size += len(prefix) + length
    return size


def _copy(source: Any, target: Any, name: str, how: int) -> None:
    """Copy the field ``name`` of ``source`` into ``target`` (see :data:`_COPY` ...)."""
    if how == _COPY:
        setattr(target, name, getattr(source, name))
    elif how == _IF_SET:
        if source.HasField(name):
            setattr(target, name, getattr(source, name))
    elif how == _MESSAGE:
        if source.HasField(name):
            getattr(target, name).CopyFrom(getattr(source, name))
    else:
        items = getattr(source, name)
        if items:
            if how == _EXTEND:
                getattr(target, name).extend(items)
            else:
                getattr(target, name).MergeFrom(items)

