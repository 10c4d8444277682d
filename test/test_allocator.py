"""``keep_freed_memory`` (issue #18): large messages reuse freed memory
instead of faulting in fresh pages on every call (the ``ipc_server`` node's
``keep_freed_memory_mb``: ``test_node.py``).

The kernel counts the page faults (``ru_minflt`` of a child process of its
own, since the setting is process-wide and stays); nothing here is timed.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vyra_base_ipc import DEFAULT_KEEP_FREED_MEMORY, keep_freed_memory

#: Allocates, writes and frees a block of SIZE bytes ten times, before and
#: after keep_freed_memory(LIMIT), the latter in the main thread or in a
#: thread started after it (WHERE); prints the page faults of each round.
CHILD = """
import json, resource, sys, threading
from vyra_base_ipc import keep_freed_memory

LIMIT, SIZE, WHERE = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
counted = {}

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        block = bytearray(SIZE)
        block[::4096] = b'x' * (SIZE // 4096)  # one write per page, as a copy would
        del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def kept():
    faults()  # the heap grows once
    counted['after'] = faults()

counted['before'] = faults()
counted['applied'] = keep_freed_memory(LIMIT)
if WHERE == 'thread':
    thread = threading.Thread(target=kept)
    thread.start()
    thread.join()
else:
    kept()
print(json.dumps(counted))
"""

#: The block of the main thread's rounds, and the faults of one round when
#: every block is fresh memory: 10 blocks of 8,192 pages.
SIZE = 32 << 20
FRESH_ROUND = 10 * SIZE // 4096
#: A block larger than the 64 MiB heap of a thread's own arena.
ABOVE_ARENA_HEAP = 96 << 20


def faults_in_child(limit: int, size: int = SIZE, where: str = 'main') -> dict[str, int]:
    done = subprocess.run([sys.executable, '-c', CHILD, str(limit), str(size), where], capture_output=True,
                          text=True, timeout=120, check=True)
    return json.loads(done.stdout)


def test_large_blocks_reuse_freed_memory_instead_of_fresh_pages() -> None:
    faults = faults_in_child(DEFAULT_KEEP_FREED_MEMORY)
    assert faults['applied'] is True
    assert faults['before'] >= FRESH_ROUND // 2, faults  # glibc's default: a new mapping per block
    assert faults['after'] < FRESH_ROUND // 20, faults


def test_freed_memory_beyond_the_limit_goes_back_to_the_kernel() -> None:
    faults = faults_in_child(1 << 20)  # less than one block: each freed block is given back
    assert faults['applied'] is True
    assert faults['after'] >= FRESH_ROUND // 2, faults


@pytest.mark.parametrize('limit, error', [(0, ValueError), (-1, ValueError), (2**31, ValueError),
                                          (1.5, TypeError), ('1G', TypeError), (True, TypeError)],
                         ids=repr)
def test_unusable_limit_is_refused_naming_it(limit: object, error: type[Exception]) -> None:
    with pytest.raises(error, match='keep_freed_memory limit'):
        keep_freed_memory(limit)  # type: ignore[arg-type]


def test_threads_started_after_it_reuse_freed_memory_of_blocks_above_an_arena_heap() -> None:
    """A 100 MiB message read in a ``def`` handler's thread or an rclpy
    executor's reuses freed memory too, not only one in the main thread."""
    faults = faults_in_child(DEFAULT_KEEP_FREED_MEMORY, ABOVE_ARENA_HEAP, 'thread')
    assert faults['applied'] is True
    assert faults['after'] < 10 * ABOVE_ARENA_HEAP // 4096 // 20, faults
