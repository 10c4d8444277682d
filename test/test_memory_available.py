"""A container's memory limit counts for a SharedBuffer: one larger than
what is left under the limit is refused with an error naming the cgroup,
not left to the OOM killer.

The end-to-end test makes a real memory cgroup under this process's own,
limits it and runs a child in it (root, and a memory hierarchy this process
may write: else it is skipped, saying why). The other tests read cgroup
files laid out as the kernel lays them out, from ``/proc`` texts in the
kernel's formats.
"""

from __future__ import annotations

import os
from pathlib import Path
import subprocess
import sys
from typing import Iterator

import pytest

from vyra_base_ipc._memory_available import CgroupLevel, cgroup_levels

MiB = 1 << 20

#: /proc/self/cgroup and /proc/self/mountinfo of a process of a Docker
#: container on a hybrid host (memory on cgroup v1), as read on one.
HYBRID_CGROUP = """12:rdma:/
4:memory:/process_api/405e21a9
3:cpuset:/
1:cpu,cpuacct:/
0::/
"""
HYBRID_MOUNTINFO = """31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:31 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:36 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""


def test_the_memory_hierarchy_of_a_hybrid_host_is_v1_from_the_process_up_to_the_root() -> None:
    levels = cgroup_levels(HYBRID_CGROUP, HYBRID_MOUNTINFO)
    assert levels == [
        CgroupLevel('/sys/fs/cgroup/memory/process_api/405e21a9', '/process_api/405e21a9', 1),
        CgroupLevel('/sys/fs/cgroup/memory/process_api', '/process_api', 1),
        CgroupLevel('/sys/fs/cgroup/memory', '/', 1)]
    assert levels[0].limit_file == '/sys/fs/cgroup/memory/process_api/405e21a9/memory.limit_in_bytes'


def test_on_cgroup_v2_the_levels_start_where_the_mount_root_maps_the_process() -> None:
    # A container with its own cgroup namespace sees its cgroup as "/"; one
    # whose /sys/fs/cgroup is a bind mount of a subtree sees the mount's root
    # in the fourth field. A cgroup outside what is mounted cannot be read.
    namespaced = cgroup_levels('0::/\n', '60 50 0:30 / /sys/fs/cgroup ro,nosuid - cgroup2 cgroup2 rw\n')
    assert namespaced == [CgroupLevel('/sys/fs/cgroup', '/', 2)]
    bound = cgroup_levels('0::/system.slice/arm.service/worker\n',
                          '60 50 0:30 /system.slice /mnt/my\\040cgroups rw - cgroup2 cgroup2 rw\n')
    assert [level.directory for level in bound] == [
        '/mnt/my cgroups/arm.service/worker', '/mnt/my cgroups/arm.service', '/mnt/my cgroups']
    assert bound[0].name == '/system.slice/arm.service/worker'
    assert cgroup_levels('0::/../other\n', '60 50 0:30 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n') == []
    assert cgroup_levels('0::/\n', HYBRID_MOUNTINFO.replace('cgroup2 cgroup2', 'tmpfs tmpfs')) == []


def test_what_is_left_under_a_v2_limit_is_the_limit_less_the_working_set(tmp_path: Path) -> None:
    module = tmp_path / 'module.slice'
    arm = module / 'arm'
    arm.mkdir(parents=True)
    (module / 'memory.max').write_text('max\n')
    (arm / 'memory.max').write_text(f'{512 * MiB}\n')
    (arm / 'memory.current').write_text(f'{300 * MiB}\n')
    (arm / 'memory.stat').write_text(f'anon {200 * MiB}\nfile {100 * MiB}\ninactive_file {60 * MiB}\n')
    levels = cgroup_levels('0::/module.slice/arm\n', f'60 50 0:30 / {tmp_path} rw - cgroup2 cgroup2 rw\n')
    assert levels[0].headroom() == (512 * MiB, 512 * MiB - (300 - 60) * MiB)
    assert levels[1].limit() is None and levels[1].headroom() is None
    assert levels[2].headroom() is None  # no files at all: no limit known
    # Usage past the limit (the kernel lets it, briefly) leaves nothing, not less.
    (arm / 'memory.current').write_text(f'{600 * MiB}\n')
    assert levels[0].headroom() == (512 * MiB, 0)
    # v1's "no limit" is the largest page-aligned long.
    v1 = CgroupLevel(str(arm), '/module.slice/arm', 1)
    (arm / 'memory.limit_in_bytes').write_text('9223372036854771712\n')
    assert v1.limit() is None


@pytest.fixture
def limited_cgroup() -> Iterator[CgroupLevel]:
    """A new memory cgroup under this process's own, limited to 256 MiB."""
    levels = cgroup_levels(Path('/proc/self/cgroup').read_text(), Path('/proc/self/mountinfo').read_text())
    if not levels:
        pytest.skip('no memory cgroup hierarchy is mounted here')
    own = levels[0]
    name = f'vyra-ipc-test-{os.getpid()}'
    level = CgroupLevel(os.path.join(own.directory, name), f'{own.name.rstrip("/")}/{name}', own.version)
    try:
        os.mkdir(level.directory)
    except OSError as error:
        pytest.skip(f'cannot make a memory cgroup under {own.directory}: {error.strerror}')
    try:
        try:
            Path(level.limit_file).write_text(str(256 * MiB))
        except OSError as error:  # e.g. v2 without the memory controller delegated
            pytest.skip(f'cannot limit the memory of {level.directory}: {error.strerror}')
        yield level
    finally:
        os.rmdir(level.directory)


#: A child that joins the cgroup ``argv[1]`` (its cgroup.procs), then says
#: what allocating a buffer of each size that follows did.
_CHILD_IN_CGROUP = """
import os, sys
with open(sys.argv[1], 'w') as procs:
    procs.write(str(os.getpid()))
from vyra_base_ipc import SharedBuffer, SharedMemoryError
for size in map(int, sys.argv[2:]):
    try:
        with SharedBuffer.allocate(size) as buffer:
            buffer.view()[-1] = 1
            print('allocated', size)
    except SharedMemoryError as error:
        print(error)
"""


def test_a_buffer_over_what_the_containers_memory_limit_leaves_is_refused_naming_the_cgroup(
        limited_cgroup: CgroupLevel) -> None:
    # Before, only the machine's memory counted: the second buffer's pages
    # were faulted in past the cgroup's limit and the kernel killed the
    # child (SIGKILL), as it kills a container's largest process.
    procs = os.path.join(limited_cgroup.directory, 'cgroup.procs')
    child = subprocess.run([sys.executable, '-c', _CHILD_IN_CGROUP, procs, str(64 * MiB), str(512 * MiB)],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, f'exit {child.returncode}: {child.stdout}{child.stderr}'
    allocated, refused = child.stdout.splitlines()
    assert allocated == f'allocated {64 * MiB}'
    assert refused.startswith(f'cannot make a shared-memory segment of {512 * MiB} bytes: only '), refused
    assert refused.endswith(f'bytes of memory are left under the memory limit of cgroup {limited_cgroup.name} '
                            f'({limited_cgroup.limit_file}: {256 * MiB})'), refused
