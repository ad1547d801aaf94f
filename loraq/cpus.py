"""How many CPUs this process may use: what `--threads 0` / `threads: 0` (the default) means.

os.cpu_count() is the machine's count; in a container or a CI job the process usually gets less:
its affinity mask (taskset, cpusets) and its cgroup's CPU quota (docker --cpus, Kubernetes limits).
Starting more worker processes or BLAS threads than the quota allows only adds contention."""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def available_cpus() -> int:
    """min(affinity mask, cgroup quota), at least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        n = min(n, quota)
    return max(1, n)


def cgroup_cpu_quota(root: Path = CGROUP_ROOT, membership: Path = Path("/proc/self/cgroup")) -> int | None:
    """The CPU quota of this process's cgroup, rounded up to whole CPUs, or None when unlimited.

    cgroup v2 `cpu.max` holds "<quota> <period>" or "max <period>" for the process's own cgroup
    (named in /proc/self/cgroup as "0::/path"); cgroup v1 splits it over cpu.cfs_quota_us
    (-1: unlimited) and cpu.cfs_period_us. Anything unreadable or malformed counts as unlimited."""
    for path in _cgroup_dirs(root, membership):
        try:
            fields = (path / "cpu.max").read_text().split()
        except OSError:
            fields = []
        if len(fields) == 2:
            if fields[0] == "max":
                continue
            return _whole_cpus(fields[0], fields[1])
        try:
            q = (path / "cpu.cfs_quota_us").read_text().strip()
            p = (path / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            continue
        if q != "-1":
            return _whole_cpus(q, p)
    return None


def _cgroup_dirs(root: Path, membership: Path) -> list[Path]:
    """The process's own cgroup folder (v2, then v1's cpu controller), then the root."""
    dirs = []
    try:
        lines = membership.read_text().splitlines()[:64]
    except OSError:
        lines = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        if controllers == "":
            dirs.append(root / rel.lstrip("/"))
        elif "cpu" in controllers.split(","):
            dirs += [root / controllers / rel.lstrip("/"), root / "cpu" / rel.lstrip("/")]
    dirs.append(root)
    return dirs


def _whole_cpus(quota: str, period: str) -> int | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    if q <= 0 or p <= 0:
        return None
    return max(1, math.ceil(q / p))
