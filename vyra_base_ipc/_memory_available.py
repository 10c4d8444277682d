"""How much memory this process may still have before the OOM killer comes.

Two limits apply, and the tighter one decides:

- **The machine's**: ``MemAvailable`` and ``SwapFree`` of ``/proc/meminfo``.
- **Its memory cgroup's**, which is a container's memory limit (``docker run
  --memory``, a Kubernetes limit, a systemd ``MemoryMax``): ``memory.max``
  (cgroup v2) or ``memory.limit_in_bytes`` (v1) of the process's cgroup and of
  every ancestor up to the root of the hierarchy as this process sees it.
  What is left under a limit is the limit less the cgroup's working set, as
  the kubelet counts it: its usage (``memory.current``,
  ``memory.usage_in_bytes``) less the page cache the kernel would reclaim
  first (``inactive_file`` of ``memory.stat``). Past it the kernel reclaims,
  swaps within the cgroup's own swap limit if any, and then kills the
  cgroup's largest process.

Everything is read from the kernel's files when asked, except where the
cgroup's files are, which is found once per process (a process does not
change its cgroup by itself). A file that cannot be read counts as no limit:
this is a guard against the OOM killer, not an accounting.
"""

from __future__ import annotations

import dataclasses
import functools
import os

__all__ = ['CgroupLevel', 'cgroup_levels', 'machine_memory', 'memory_headroom', 'memory_limit']


@dataclasses.dataclass(frozen=True)
class CgroupLevel:
    """One memory cgroup above this process (itself first): where its files
    are, its name in ``/proc/self/cgroup``'s terms, and its version (1 or 2)."""

    directory: str
    name: str
    version: int

    @property
    def limit_file(self) -> str:
        """The file that holds its limit."""
        return self._file('memory.max', 'memory.limit_in_bytes')

    def limit(self) -> int | None:
        """Its memory limit in bytes, or ``None`` if it has none (or it
        cannot be read)."""
        limit = _number(self.limit_file)  # v2 writes no limit as "max"
        # v1 writes it as the largest page-aligned long.
        return limit if limit is not None and limit < machine_memory() else None

    def headroom(self) -> tuple[int, int] | None:
        """``(limit, bytes left under it)``, or ``None`` if it has no limit.

        Left is the limit less the working set (usage less inactive page
        cache), at least 0.
        """
        limit = self.limit()
        if limit is None:
            return None
        used = _number(self._file('memory.current', 'memory.usage_in_bytes')) or 0
        return limit, max(0, limit - max(0, used - self._inactive_file()))

    def _file(self, v2: str, v1: str) -> str:
        return os.path.join(self.directory, v2 if self.version == 2 else v1)

    def _inactive_file(self) -> int:
        # v1's total_ counters include the descendants', as usage_in_bytes does.
        wanted = 'inactive_file' if self.version == 2 else 'total_inactive_file'
        for line in (_read(os.path.join(self.directory, 'memory.stat')) or '').splitlines():
            key, _, value = line.partition(' ')
            if key == wanted:
                return int(value) if value.isdigit() else 0
        return 0


def cgroup_levels(cgroup: str, mountinfo: str) -> list[CgroupLevel]:
    """The memory cgroups of a process whose ``/proc/self/cgroup`` reads
    ``cgroup`` and ``/proc/self/mountinfo`` reads ``mountinfo``: its own
    first, then each parent up to the root of the mounted hierarchy.

    The v1 memory hierarchy if it is mounted (a hybrid layout keeps memory on
    v1), else the unified v2 one. Empty if neither is mounted or the
    process's cgroup is outside what is mounted (another cgroup namespace's).
    """
    paths: dict[int, str] = {}
    for line in cgroup.splitlines():
        hierarchy, _, rest = line.partition(':')
        controllers, _, path = rest.partition(':')
        if hierarchy == '0' and not controllers:
            paths.setdefault(2, path)
        elif 'memory' in controllers.split(','):
            paths[1] = path
    for version, path in sorted(paths.items()):
        if '..' in path.split('/'):  # outside this cgroup namespace: not mounted here
            continue
        for root, mount_point in _mounts(mountinfo, version):
            root = root.rstrip('/')
            if path == root or path.startswith(root + '/'):
                return _up_to(mount_point, root, path[len(root):].strip('/'), version)
    return []


@functools.cache
def _own_levels() -> tuple[CgroupLevel, ...]:
    try:
        with open('/proc/self/cgroup', encoding='utf-8') as cgroup, \
                open('/proc/self/mountinfo', encoding='utf-8') as mountinfo:
            return tuple(cgroup_levels(cgroup.read(), mountinfo.read()))
    except OSError:
        return ()


@functools.cache
def machine_memory() -> int:
    """The machine's memory in bytes (without swap)."""
    return os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')


@functools.cache
def memory_limit() -> int:
    """The most memory this process could ever have, in bytes: the machine's,
    or the tightest memory limit of its cgroups if lower, as they were when
    first asked."""
    limits = [limit for level in _own_levels() if (limit := level.limit()) is not None]
    return min([machine_memory(), *limits])


def memory_headroom() -> tuple[int, str]:
    """``(bytes, what limits them)``: how much memory this process may still
    fault in now, the tighter of the machine's available memory and what is
    left under each of its cgroups' limits. ``what`` completes "only N bytes
    of memory are …" in an error."""
    try:
        with open('/proc/meminfo', 'rb') as meminfo:
            fields = dict(line.split(b':', 1) for line in meminfo)
        left = (int(fields[b'MemAvailable'].split()[0]) + int(fields[b'SwapFree'].split()[0])) * 1024
        what = 'available (MemAvailable and SwapFree)'
    except (OSError, KeyError, ValueError):
        left, what = machine_memory(), "in this machine's memory"
    for level in _own_levels():
        headroom = level.headroom()
        if headroom is not None and headroom[1] < left:
            left = headroom[1]
            what = f'left under the memory limit of cgroup {level.name} ({level.limit_file}: {headroom[0]})'
    return left, what


def _mounts(mountinfo: str, version: int) -> list[tuple[str, str]]:
    """``(root, mount point)`` of each mount of the memory hierarchy of
    ``version`` in ``mountinfo``."""
    mounts = []
    for line in mountinfo.splitlines():
        fields, _, after = line.partition(' - ')
        parts, described = fields.split(), after.split()
        if len(parts) < 5 or len(described) < 3:
            continue
        kind, options = described[0], described[2].split(',')
        if kind == 'cgroup2' if version == 2 else kind == 'cgroup' and 'memory' in options:
            mounts.append((_unescape(parts[3]), _unescape(parts[4])))
    return mounts


def _up_to(mount_point: str, root: str, relative: str, version: int) -> list[CgroupLevel]:
    """The levels from ``mount_point/relative`` up to ``mount_point``, where
    the cgroup ``root`` (``''`` for the hierarchy's root) is mounted."""
    names = relative.split('/') if relative else []
    return [CgroupLevel(os.path.join(mount_point, *names[:depth]), '/'.join([root, *names[:depth]]) or '/',
                        version)
            for depth in range(len(names), -1, -1)]


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as octal escapes.
    for escaped, character in (('\\040', ' '), ('\\011', '\t'), ('\\012', '\n'), ('\\134', '\\')):
        field = field.replace(escaped, character)
    return field


def _number(path: str) -> int | None:
    text = _read(path)
    return int(text) if text is not None and text.isdigit() else None


def _read(path: str) -> str | None:
    try:
        with open(path, encoding='ascii') as file:
            return file.read().strip()
    except (OSError, ValueError):
        return None
