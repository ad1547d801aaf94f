"""`threads: 0` means the CPUs this process may use: its affinity mask and its cgroup's CPU quota."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from loraq import cpus
from loraq.pipeline.checkpoint import cpu_threads


def _cgroup(tmp_path: Path, membership: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "sys-fs-cgroup"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    root.mkdir(exist_ok=True)
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(membership)
    return root, proc


@pytest.mark.parametrize(
    ("membership", "files", "want"),
    [
        ("0::/ci/job\n", {"ci/job/cpu.max": "150000 100000\n"}, 2),  # docker --cpus 1.5: two workers, not the host's count
        ("0::/ci/job\n", {"ci/job/cpu.max": "50000 100000\n"}, 1),
        ("0::/ci/job\n", {"ci/job/cpu.max": "max 100000\n"}, None),
        ("0::/ci/job\n", {"ci/job/cpu.max": "max 100000\n", "cpu.max": "400000 100000\n"}, 4),  # the limit is higher up
        ("0::/\n", {"cpu.max": "garbage\n"}, None),
        ("0::/\n", {"cpu.max": "-5 100000\n"}, None),
        ("0::/\n", {}, None),
        ("3:cpu,cpuacct:/job\n", {"cpu,cpuacct/job/cpu.cfs_quota_us": "300000\n", "cpu,cpuacct/job/cpu.cfs_period_us": "100000\n"}, 3),
        ("3:cpu,cpuacct:/job\n", {"cpu,cpuacct/job/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/job/cpu.cfs_period_us": "100000\n"}, None),
        ("not a cgroup line\n", {"cpu.max": "200000 100000\n"}, 2),
    ],
)
def test_cgroup_quota(tmp_path: Path, membership: str, files: dict[str, str], want: int | None) -> None:
    root, proc = _cgroup(tmp_path, membership, files)
    assert cpus.cgroup_cpu_quota(root, proc) == want


def test_available_cpus_is_the_smaller_of_affinity_and_quota(monkeypatch) -> None:
    affinity = len(os.sched_getaffinity(0))
    monkeypatch.setattr(cpus, "cgroup_cpu_quota", lambda *a: 1)
    assert cpus.available_cpus() == 1 and cpu_threads(0) == 1 and cpu_threads(3) == 3
    monkeypatch.setattr(cpus, "cgroup_cpu_quota", lambda *a: None)
    assert cpus.available_cpus() == affinity
    monkeypatch.setattr(cpus, "cgroup_cpu_quota", lambda *a: 10_000)
    assert cpus.available_cpus() == affinity
