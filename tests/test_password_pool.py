"""The password threads: one per CPU the process may use (its cpuset or taskset mask,
and at most its cgroup's CPU quota), not one per CPU of the machine, which in a
container limited to fewer CPUs would only make the hashing threads take turns."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vault import CHEAPEST, PasswordHasher
from vault.passwords import cgroup_cpu_quota, usable_cpus

pytestmark = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform"
)


def test_the_default_pool_has_one_thread_per_usable_cpu() -> None:
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(allowed)})  # this thread only; restored below
    try:
        pinned = PasswordHasher(CHEAPEST)
    finally:
        os.sched_setaffinity(0, allowed)
    unpinned, configured = PasswordHasher(CHEAPEST), PasswordHasher(CHEAPEST, workers=3)
    try:
        assert pinned.workers == 1
        assert unpinned.workers == usable_cpus()  # all allowed CPUs, unless a quota is lower
        assert 1 <= unpinned.workers <= len(allowed)
        assert configured.workers == 3  # the setting wins
    finally:
        for hasher in (pinned, unpinned, configured):
            hasher.close()


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_a_cgroup_v2_cpu_quota_caps_the_pool(tmp_path: Path) -> None:
    """Kubernetes' CPU limit is the pod's cgroup cpu.max: the lowest quota on the way
    up counts, rounded up; "max" is no quota."""
    proc, root = tmp_path / "cgroup", tmp_path / "fs"
    _write(proc, "0::/kubepods/pod1/ctr\n")
    _write(root / "kubepods/pod1/ctr/cpu.max", "max 100000\n")
    _write(root / "kubepods/pod1/cpu.max", "150000 100000\n")  # 1.5 CPUs
    _write(root / "kubepods/cpu.max", "800000 100000\n")
    assert cgroup_cpu_quota(proc, root) == 1.5
    assert usable_cpus(proc, root) == min(2, len(os.sched_getaffinity(0)))


def test_a_cgroup_v1_cfs_quota_caps_the_pool(tmp_path: Path) -> None:
    proc, root = tmp_path / "cgroup", tmp_path / "fs"
    _write(proc, "4:memory:/docker/abc\n2:cpu,cpuacct:/docker/abc\n")
    _write(root / "cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "50000\n")
    _write(root / "cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000\n")
    _write(root / "cpu,cpuacct/cpu.cfs_quota_us", "-1\n")  # the root: no quota
    _write(root / "cpu,cpuacct/cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_quota(proc, root) == 0.5
    assert usable_cpus(proc, root) == 1  # half a CPU is still one thread


def test_no_quota_or_an_unreadable_one_leaves_the_affinity(tmp_path: Path) -> None:
    proc, root = tmp_path / "cgroup", tmp_path / "fs"
    allowed = len(os.sched_getaffinity(0))
    assert cgroup_cpu_quota(proc, root) is None  # no /proc/self/cgroup at all
    _write(proc, "0::/\n")
    _write(root / "cpu.max", "max 100000\n")
    assert usable_cpus(proc, root) == allowed
    _write(root / "cpu.max", "garbage\n")
    assert cgroup_cpu_quota(proc, root) is None
    # Whatever this machine's own cgroups say, the pool has at least one thread.
    assert 1 <= usable_cpus() <= allowed
