"""How much CPU and memory this process may really use, for sizing thread pools and trainings.

``os.sched_getaffinity`` counts the cores a process may be scheduled on, which in a container
is usually every core of the node: a pod limited to 2 CPUs on a 64-core node would start 64
decode threads, each with its own buffers, and get throttled by the CFS quota. ``cpu_budget()``
also reads the cgroup CPU quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``)
of this process's cgroup and of each cgroup above it, and ``FELIS_TORCH_THREADS`` overrides both.
``memory_budget()`` is the same for memory: the smallest cgroup limit up the chain (v2
``memory.max``, v1 ``memory.limit_in_bytes``), capped by the machine's ``MemTotal``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
PROC_MEMINFO = Path("/proc/meminfo")
_V1_CPU_MOUNTS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")


def _cgroup_paths(proc_cgroup: Path, controller: str = "cpu") -> tuple[str | None, str | None]:
    """(the v2 path, the v1 controller's path) of this process, from /proc/self/cgroup."""
    v2 = v1 = None
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            v2 = path
        elif controller in controllers.split(","):
            v1 = path
    return v2, v1


def _dirs(base: Path, rel: str | None) -> list[Path]:
    """base/rel and every directory above it up to base (a limit anywhere up the tree applies).
    Inside a container's cgroup namespace rel is usually '/', so this is just base."""
    out: list[Path] = []
    if rel:
        d = base / rel.lstrip("/")
        while d != base and base in d.parents:
            if d.is_dir():
                out.append(d)
            d = d.parent
    if base.is_dir():
        out.append(base)
    return out


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """CPUs allowed by the cgroup CPU quota (e.g. 1.5), or None when there is no quota."""
    v2, v1 = _cgroup_paths(proc_cgroup)
    limits: list[float] = []
    for d in _dirs(root, v2 if v2 is not None else "/"):
        text = _read(d / "cpu.max")  # "max 100000" or "<quota> <period>"
        if text:
            quota, _, period = text.partition(" ")
            if quota != "max" and quota.isdigit() and period.isdigit() and int(period) > 0:
                limits.append(int(quota) / int(period))
    for mount in _V1_CPU_MOUNTS:
        for d in _dirs(root / mount, v1 if v1 is not None else "/"):
            quota, period = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
            # quota -1: no quota
            if quota and period and quota.isdigit() and period.isdigit() and int(quota) > 0 and int(period) > 0:
                limits.append(int(quota) / int(period))
    return min(limits) if limits else None


def _schedulable_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def cpu_budget(torch_threads: int | None = None, *, root: Path = CGROUP_ROOT,
               proc_cgroup: Path = PROC_CGROUP) -> int:
    """Threads worth running for CPU-bound work in this process: ``FELIS_TORCH_THREADS`` when it
    is set (> 0), else the schedulable cores capped by the cgroup CPU quota (rounded up), at least 1.

    ``torch_threads`` defaults to the setting (``get_settings().torch_threads``)."""
    if torch_threads is None:
        from service.config import get_settings

        torch_threads = get_settings().torch_threads
    if torch_threads and torch_threads > 0:
        return int(torch_threads)
    cpus = _schedulable_cpus()
    quota = cgroup_cpu_limit(root, proc_cgroup)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota - 1e-9)))
    return max(1, cpus)


def cgroup_memory_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int | None:
    """Bytes allowed by the cgroup memory limit (the smallest up the chain), or None without one."""
    v2, v1 = _cgroup_paths(proc_cgroup, "memory")
    limits: list[int] = []
    for d in _dirs(root, v2 if v2 is not None else "/"):
        text = _read(d / "memory.max")  # "max" or bytes
        if text and text.isdigit():
            limits.append(int(text))
    for d in _dirs(root / "memory", v1 if v1 is not None else "/"):
        text = _read(d / "memory.limit_in_bytes")  # no limit: a huge number (PAGE_COUNTER_MAX pages)
        if text and text.isdigit() and int(text) < 1 << 62:
            limits.append(int(text))
    return min(limits) if limits else None


def machine_memory(meminfo: Path = PROC_MEMINFO) -> int | None:
    """The machine's memory (MemTotal), in bytes; None when /proc/meminfo cannot say."""
    for line in (_read(meminfo) or "").splitlines():
        name, _, value = line.partition(":")
        if name == "MemTotal":
            number, _, unit = value.strip().partition(" ")
            if number.isdigit():
                return int(number) * (1024 if unit.strip().lower() == "kb" else 1)
    return None


def memory_budget(*, root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP, meminfo: Path = PROC_MEMINFO) -> int:
    """Bytes this process may use: its cgroup's memory limit, capped by the machine's memory;
    without either (not Linux), what the OS reports, else 0 (unknown)."""
    sizes = [m for m in (cgroup_memory_limit(root, proc_cgroup), machine_memory(meminfo)) if m]
    if not sizes:
        try:
            sizes = [os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")]
        except (ValueError, OSError, AttributeError):
            return 0
    return min(sizes)
