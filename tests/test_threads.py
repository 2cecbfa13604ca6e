"""train.threads: torch's CPU threads from the CPUs this process may use, not the host's core count."""

from __future__ import annotations

import pytest
import torch

from tunesmith.train import threads
from tunesmith.train.threads import choose_threads, quota_from_cfs, quota_from_cpu_max, usable_cpus


@pytest.mark.parametrize("text, quota", [
    ("max 100000\n", None),  # no limit
    ("200000 100000\n", 2.0),  # docker --cpus 2
    ("150000 100000", 1.5),
    ("50000 100000", 0.5),
    ("", None), ("garbage", None), ("0 100000", None),
])
def test_cgroup_v2_cpu_max(text, quota):
    assert quota_from_cpu_max(text) == quota


def test_cgroup_v1_cfs_quota():
    assert quota_from_cfs("-1\n", "100000\n") is None  # no limit
    assert quota_from_cfs("400000\n", "100000\n") == 4.0
    assert quota_from_cfs("x", "100000") is None


@pytest.mark.parametrize("affinity, quota, cpus", [
    (64, None, 64),  # a whole host
    (64, 2.0, 2),  # a 64-core host, a container with --cpus 2
    (64, 1.5, 2),  # a fractional quota rounds up
    (64, 0.5, 1),
    (4, 8.0, 4),  # --cpuset-cpus 0-3 with a looser quota
    (0, None, 1),
])
def test_usable_cpus(affinity, quota, cpus):
    assert usable_cpus(affinity, quota) == cpus


def test_choice_and_its_precedence():
    assert choose_threads(0, None, 16, 1)[0] == 16
    assert choose_threads(0, None, 16, 4)[0] == 4  # torchrun: 4 processes on the node share it
    assert choose_threads(0, None, 2, 4)[0] == 1  # never 0
    n, why = choose_threads(0, "3", 16, 1)
    assert n == 3 and "OMP_NUM_THREADS" in why  # the environment wins over the automatic choice
    assert choose_threads(5, "3", 16, 1) == (5, "train.threads")  # an explicit option wins over both
    assert choose_threads(0, "", 16, 2)[0] == 8 and choose_threads(0, "x", 16, 2)[0] == 8  # unusable: ignored


def test_set_cpu_threads_reads_the_machine(monkeypatch):
    monkeypatch.setattr(threads, "read_affinity", lambda: 48)
    monkeypatch.setattr(threads, "read_quota", lambda: 3.0)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    before = torch.get_num_threads()
    try:
        assert threads.set_cpu_threads(0) == 3 and torch.get_num_threads() == 3
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
        assert threads.set_cpu_threads(0) == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert threads.set_cpu_threads(0) == 2
    finally:
        torch.set_num_threads(before)


def test_reading_this_machine_works():
    assert threads.read_affinity() >= 1
    quota = threads.read_quota()
    assert quota is None or quota > 0
