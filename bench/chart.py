"""The PNG chart: latency by payload, one line per transport (sequential calls)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .payloads import size_label

__all__ = ['write_chart']


def _style(key: str) -> dict[str, Any]:
    # This package's rows stand out; the references (floor, ROS 2) are dashed;
    # bare grpcio, which mostly lies under the package's lines, stays thin.
    if key.startswith('ipc-'):
        return {'linestyle': '-', 'linewidth': 2.5}
    if key.startswith(('socket', 'rclpy')):
        return {'linestyle': '--', 'linewidth': 2.0}
    return {'linestyle': '-', 'linewidth': 1.0, 'alpha': 0.6, 'markersize': 4}


def write_chart(results: dict[str, Any], path: Path) -> Path:
    """Plot p50 (left) and p99 (right) against payload size on log–log axes.

    :raises ImportError: if matplotlib is missing (see ``bench/requirements.txt``).
    """
    import matplotlib
    matplotlib.use('Agg')  # files only, no display needed
    import matplotlib.pyplot as plt

    series: dict[str, list[dict[str, Any]]] = {}
    for row in results['rows']:
        if row['concurrency'] == 1:
            series.setdefault(row['transport'], []).append(row)
    sizes = sorted({row['payload_bytes'] for rows in series.values() for row in rows})

    figure, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    for axis, column, title in ((axes[0], 'p50_us', 'p50'), (axes[1], 'p99_us', 'p99')):
        for key, rows in series.items():
            rows = sorted(rows, key=lambda row: row['payload_bytes'])
            axis.plot([row['payload_bytes'] for row in rows], [row[column] / 1e3 for row in rows],
                      marker='o', label=key, **_style(key))
        axis.set_xscale('log')
        axis.set_yscale('log')
        axis.set_xticks(sizes, [size_label(size) for size in sizes])
        axis.minorticks_off()
        axis.set_xlabel('payload (request and reply each)')
        axis.set_title(f'{title} round trip, one call at a time')
        axis.grid(True, which='both', alpha=0.3)
    axes[0].set_ylabel('latency (ms, log scale)')
    axes[1].legend(loc='upper left', fontsize='small')
    machine = results['meta']['machine']
    figure.suptitle(f"vyra_base_ipc benchmark ({results['meta']['mode']}): {machine['cpu']}, "
                    f"{machine['cores']} cores, grpcio {machine['grpcio']}", fontsize='medium')
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
