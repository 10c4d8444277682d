"""Latency samples and their summary: what one row of the results holds."""

from __future__ import annotations

from dataclasses import dataclass
import math
from typing import Any, Sequence

__all__ = ['ROW_COLUMNS', 'Sample', 'percentile', 'summarize']

#: Columns of every measured row, in table order (the smoke test checks them).
ROW_COLUMNS = ('transport', 'label', 'client', 'server', 'address', 'lane', 'payload_bytes',
               'concurrency', 'calls', 'p50_us', 'p99_us', 'mean_us', 'calls_per_s', 'mib_per_s')


@dataclass
class Sample:
    """Latencies of ``len(latencies_ns)`` calls that took ``wall_ns`` in all."""

    latencies_ns: list[int]
    wall_ns: int


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile (0..1) of ascending ``sorted_values``, by the
    nearest-rank method (no interpolation, so p99 of 100 samples is the 99th).

    :raises ValueError: on an empty sequence or a fraction outside 0..1.
    """
    if not sorted_values:
        raise ValueError('percentile of no values')
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f'fraction must be within 0..1, not {fraction}')
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return float(sorted_values[rank - 1])


def summarize(sample: Sample, payload_bytes: int) -> dict[str, Any]:
    """p50/p99/mean latency in µs, calls/s over the wall time, and MiB/s of
    payload moved (request plus reply)."""
    values = sorted(sample.latencies_ns)
    calls = len(values)
    wall_s = sample.wall_ns / 1e9
    calls_per_s = calls / wall_s if wall_s > 0 else float('nan')
    return {
        'calls': calls,
        'p50_us': round(percentile(values, 0.50) / 1e3, 1),
        'p99_us': round(percentile(values, 0.99) / 1e3, 1),
        'mean_us': round(sum(values) / calls / 1e3, 1),
        'calls_per_s': round(calls_per_s, 1),
        'mib_per_s': round(calls_per_s * 2 * payload_bytes / 2**20, 1),
    }
