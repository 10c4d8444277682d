"""What a field descriptor says, asked the same way on every protobuf
version this package supports (protobuf 7 dropped ``FieldDescriptor.label``
for ``is_repeated`` and ``is_required``)."""

from __future__ import annotations

from typing import Any

__all__ = ['is_repeated', 'is_required']


def is_repeated(field: Any) -> bool:
    """Whether ``field`` (a ``FieldDescriptor``) is repeated (a map field too)."""
    repeated = getattr(field, 'is_repeated', None)
    return bool(repeated) if repeated is not None else field.label == field.LABEL_REPEATED


def is_required(field: Any) -> bool:
    """Whether ``field`` (a ``FieldDescriptor``) is required (proto2)."""
    required = getattr(field, 'is_required', None)
    return bool(required) if required is not None else field.label == field.LABEL_REQUIRED
