"""The public settings of this process's pool of shared-memory segments
(:mod:`vyra_base_ipc._segment_pool`): checked, then applied at once."""

from __future__ import annotations

from ._options import MAX_SECONDS
from ._segment_pool import segment_pool

__all__ = ['configure_shared_memory_pool']


def configure_shared_memory_pool(*, max_bytes: int | None = None, max_free_bytes: int | None = None,
                                 idle_seconds: float | None = None, max_segments: int | None = None
                                 ) -> dict[str, float]:
    """Set the limits of this process's pool of shared-memory segments
    (what the fast lane's large messages and :class:`~vyra_base_ipc.SharedBuffer`
    objects are written into); a limit left ``None`` keeps its setting.
    Returns the four settings now.

    :param max_bytes: bound on the bytes of all its segments, in use and
        free (default 1 GiB). A message that finds no room goes in a sealed
        memfd of its own, as before there was a pool; 0 turns pooling off.
    :param max_free_bytes: bytes of free segments kept for reuse (default
        256 MiB); the oldest beyond go at once.
    :param idle_seconds: a free segment unused this long is dropped
        (default 10 s), whether or not the pool is used meanwhile.
    :param max_segments: bound on the number of its segments, in use and
        free (default 1,024); each holds two open files (the memfd and,
        before Python 3.13, the mapping's copy of it). Past it, as past
        ``max_bytes``.
    :raises TypeError, ValueError: a limit that is not a number of bytes or
        segments (an int >= 0) or of seconds (finite, >= 0), naming it.
    """
    pool = segment_pool()
    settings = {'max_bytes': pool.max_bytes, 'max_free_bytes': pool.max_free_bytes,
                'idle_seconds': pool.idle_seconds, 'max_segments': pool.max_segments}
    for name, value, unit in (('max_bytes', max_bytes, 'bytes'), ('max_free_bytes', max_free_bytes, 'bytes'),
                              ('max_segments', max_segments, 'segments')):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f'{name} must be a number of {unit} (int), not {type(value).__name__}')
        if value < 0:
            raise ValueError(f'{name} must be >= 0 {unit}, not {value}')
        settings[name] = value
    if idle_seconds is not None:
        if isinstance(idle_seconds, bool) or not isinstance(idle_seconds, (int, float)):
            raise TypeError(f'idle_seconds must be a number of seconds, not {type(idle_seconds).__name__}')
        if not 0 <= idle_seconds <= MAX_SECONDS:  # (the trim thread's wait takes no more)
            raise ValueError(f'idle_seconds must be a number of seconds >= 0 and at most {MAX_SECONDS:g}, '
                             f'not {idle_seconds}')
        settings['idle_seconds'] = float(idle_seconds)
    pool.configure(int(settings['max_bytes']), int(settings['max_free_bytes']), settings['idle_seconds'],
                   int(settings['max_segments']))
    return settings
