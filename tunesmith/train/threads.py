"""How many threads torch computes with on the CPU: the CPUs this process may really use.

torch sizes its intra-op thread pool by the host's cores. Inside a container that is wrong in
two ways: the CPU affinity mask (docker --cpuset-cpus, taskset) may allow fewer cores, and a
cgroup CPU quota (docker --cpus, a Kubernetes CPU limit) may allow fewer core-seconds per second
than there are cores. More busy threads than allowed CPUs is oversubscription: threads wait on
each other at every parallel region and the quota throttles them, so a step gets slower, not
faster. Under torchrun several processes share the machine, so each takes its share.

    threads = train.threads                                   when set (> 0)
            = OMP_NUM_THREADS                                 when the environment sets it
            = min(affinity, ceil(cgroup quota)) // processes on this node, at least 1

The parsing functions take the file contents, so they are tested without a container.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CGROUP_V2 = Path("/sys/fs/cgroup/cpu.max")  # "QUOTA PERIOD" in microseconds, or "max PERIOD"
CGROUP_V1 = Path("/sys/fs/cgroup/cpu")  # cpu.cfs_quota_us (-1: none) and cpu.cfs_period_us


def quota_from_cpu_max(text: str) -> float | None:
    """cgroup v2 cpu.max ("200000 100000" -> 2.0 CPUs); None when unlimited ("max ...") or unreadable."""
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    return _ratio(parts[0], parts[1])


def quota_from_cfs(quota_us: str, period_us: str) -> float | None:
    """cgroup v1 cpu.cfs_quota_us / cpu.cfs_period_us; None when unlimited (quota -1) or unreadable."""
    return _ratio(quota_us.strip(), period_us.strip())


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def usable_cpus(affinity: int, quota: float | None) -> int:
    """CPUs the process may use. A fractional quota rounds up: 1.5 CPUs run two threads at 75% each,
    which gets the whole quota done, where one thread would leave half a CPU unused."""
    if quota is None:
        return max(1, affinity)
    return max(1, min(affinity, math.ceil(quota)))


def choose_threads(requested: int, omp_env: str | None, cpus: int, local_processes: int) -> tuple[int, str]:
    """(threads, why): train.threads if set, else OMP_NUM_THREADS if set, else this process's share of the CPUs."""
    share = max(1, cpus // max(1, local_processes))
    if requested > 0:
        return requested, "train.threads"
    if omp_env and omp_env.strip().isdigit() and int(omp_env) > 0:
        return int(omp_env), f"OMP_NUM_THREADS is set and wins over the automatic {share}"
    return share, f"{cpus} usable CPUs / {local_processes} process(es) on this node"


def read_quota() -> float | None:
    """This container's CPU quota from cgroup v2, else v1; None when there is none or no cgroup fs."""
    try:
        return quota_from_cpu_max(CGROUP_V2.read_text())
    except OSError:
        pass
    try:
        return quota_from_cfs((CGROUP_V1 / "cpu.cfs_quota_us").read_text(),
                              (CGROUP_V1 / "cpu.cfs_period_us").read_text())
    except OSError:
        return None


def read_affinity() -> int:
    """CPUs in this process's affinity mask (all CPUs where the OS has no such call, e.g. macOS)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def set_cpu_threads(requested: int) -> int:
    """Set torch's intra-op threads for CPU training (see the module docstring); returns the number."""
    cpus = usable_cpus(read_affinity(), read_quota())
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads, why = choose_threads(requested, os.environ.get("OMP_NUM_THREADS"), cpus, local)
    log.info("CPU threads: %d (%s)", threads, why)
    torch.set_num_threads(threads)
    return threads
