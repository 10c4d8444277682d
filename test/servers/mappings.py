"""Which mapping of this process holds a buffer: the proof that a view is
backed by a shared-memory file rather than a private copy."""

from __future__ import annotations

from typing import NamedTuple


class Mapping(NamedTuple):
    """One line of ``/proc/self/maps``."""

    start: int
    end: int
    inode: int
    #: The mapped file as the kernel names it (``/memfd:NAME (deleted)``), or ''.
    path: str


def mapping_of(view: memoryview) -> Mapping | None:
    """The mapping that holds ``view``'s first byte, or ``None`` if unmapped."""
    import numpy  # the address of a read-only buffer, as a NumPy user would take it

    address = numpy.frombuffer(view, dtype=numpy.uint8).ctypes.data
    with open('/proc/self/maps') as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            start, end = (int(bound, 16) for bound in fields[0].split('-'))
            if start <= address < end:
                path = fields[5].strip() if len(fields) > 5 else ''
                return Mapping(start, end, int(fields[4]), path)
    return None
