"""Text for a terminal of 80 columns: aligned tables, wrapped lists,
durations and sizes, a latency histogram and a progress bar; and a stream
that shows control characters escaped."""

from __future__ import annotations

import bisect
import io
import re
from typing import Iterable, Iterator, Sequence, TextIO

__all__ = ['WIDTH', 'EscapingStream', 'Progress', 'duration', 'histogram', 'histogram_lines', 'printable',
           'size', 'table', 'uptime', 'wrapped']

#: Columns the human output is made for.
WIDTH = 80

#: What a terminal would act on instead of showing: C0 controls but tab and
#: newline, DEL, C1 controls (U+009B is a CSI to some terminals), and the
#: bidirectional and zero-width format characters that reorder or hide text.
_CONTROLS = re.compile(r'[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]')


def printable(text: str) -> str:
    r"""``text`` with each control character (see ``_CONTROLS``) written as
    ``\uXXXX``: as a terminal shows it, and the same string again inside
    a JSON string."""
    return _CONTROLS.sub(lambda found: f'\\u{ord(found[0]):04x}', text)


class EscapingStream(io.TextIOBase):
    """Writes to ``stream`` what it is given through :func:`printable`.

    Names and messages ``vyra-ipc`` shows come from servers and socket files
    of other users: an escape sequence in one must not recolour, retitle or
    rewrite the terminal, or hide what follows it."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        #: The stream beneath, for what this program draws itself (a progress bar's carriage returns).
        self.raw = stream

    def write(self, text: str) -> int:
        self.raw.write(printable(text))
        return len(text)

    def flush(self) -> None:
        self.raw.flush()

    def fileno(self) -> int:
        return self.raw.fileno()

    def isatty(self) -> bool:
        return self.raw.isatty()

    def writable(self) -> bool:
        return True


def table(rows: Sequence[Sequence[str]], right: Iterable[int] = ()) -> Iterator[str]:
    """``rows`` (the first one the header) in aligned columns two spaces
    apart; the columns numbered in ``right`` right-aligned."""
    right = set(right)
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        cells = (cell.rjust(width) if column in right else cell.ljust(width)
                 for column, (cell, width) in enumerate(zip(row, widths, strict=True)))
        yield '  '.join(cells).rstrip()


def wrapped(label: str, items: Sequence[str], indent: int, width: int = WIDTH) -> Iterator[str]:
    """``label`` and then ``items`` separated by commas, wrapped at
    ``width`` between items; continuation lines under the first item."""
    line = ' ' * indent + label
    start = len(line)
    for index, item in enumerate(items):
        text = item + (',' if index < len(items) - 1 else '')
        if len(line) > start and len(line) + 1 + len(text) > width:
            yield line
            line = ' ' * start + text
        else:
            line += ('' if len(line) == start else ' ') + text
    yield line


def duration(seconds: float) -> str:
    """``118 µs``, ``1.75 ms``, ``2.40 s``."""
    if seconds >= 1:
        return f'{seconds:.2f} s'
    if seconds >= 1e-3:
        return f'{seconds * 1e3:.2f} ms'
    return f'{seconds * 1e6:.0f} µs'


def uptime(seconds: float) -> str:
    """``42 s``, ``7 min 28 s``, ``3 h 12 min``, ``2 d 5 h``."""
    whole = int(seconds)
    if whole < 60:
        return f'{whole} s'
    if whole < 3600:
        return f'{whole // 60} min {whole % 60} s'
    if whole < 86400:
        return f'{whole // 3600} h {whole % 3600 // 60} min'
    return f'{whole // 86400} d {whole % 86400 // 3600} h'


def size(count: int) -> str:
    """Bytes in B, KiB, MiB or GiB."""
    value = float(count)
    for unit in ('B', 'KiB', 'MiB'):
        if value < 1024:
            return f'{value:.0f} {unit}' if unit == 'B' else f'{value:.1f} {unit}'
        value /= 1024
    return f'{value:.1f} GiB'


def histogram(ordered: Sequence[float], buckets: int = 8) -> list[tuple[float, int]]:
    """``(upper bound, count)`` of ``buckets`` buckets of the sorted,
    positive values ``ordered``, in equal ratios from the least to the
    greatest (latencies spread over orders of magnitude: a long tail gets
    buckets of its own instead of one wide first bucket)."""
    low, high = ordered[0], ordered[-1]
    if high <= low or low <= 0:
        return [(high, len(ordered))]
    ratio = (high / low) ** (1 / buckets)
    bounds = [low * ratio ** (index + 1) for index in range(buckets)]
    bounds[-1] = high
    counts = [0] * buckets
    for value in ordered:
        counts[min(buckets - 1, bisect.bisect_left(bounds, value))] += 1
    return list(zip(bounds, counts, strict=True))


def histogram_lines(buckets: Sequence[tuple[float, int]], bar: int = 40) -> Iterator[str]:
    """A text histogram: one line per bucket, ``<= bound | ##### count``."""
    peak = max(count for _, count in buckets) or 1
    labels = [f'<= {duration(bound)}' for bound, _ in buckets]
    width = max(len(label) for label in labels)
    for label, (_, count) in zip(labels, buckets, strict=True):
        marks = '#' * (max(1, round(count / peak * bar)) if count else 0)
        yield f'{label:>{width}} | {marks:<{bar}} {count}'


class Progress:
    """A progress bar drawn on ``stream`` (a terminal) and erased when done;
    with ``stream`` None it draws nothing."""

    def __init__(self, total: int, stream: TextIO | None, label: str = '') -> None:
        self.total, self.stream, self.label, self.count = total, stream, label, 0
        self._every = max(1, total // 100)

    def step(self) -> None:
        """One more done; redrawn every hundredth of the way."""
        self.count += 1
        if self.stream is not None and (self.count % self._every == 0 or self.count == self.total):
            bar = ('=' * (self.count * 40 // self.total)).ljust(40)
            self.stream.write(f'\r{self.label}[{bar}] {self.count}/{self.total}')
            self.stream.flush()

    def done(self) -> None:
        """Erase the bar."""
        if self.stream is not None:
            self.stream.write('\r' + ' ' * (WIDTH - 1) + '\r')
            self.stream.flush()
