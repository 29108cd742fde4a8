"""kube-proxy's conntrack sysctls (`--conntrack-*`), on a /proc/sys and a hashsize file in a
temporary directory: the machine's own values are never touched here (the end-to-end test
sets them in a lab node's namespace)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pykp.netfilter.conntrack_sysctls import (
    MAX_SCALED,
    ConntrackSettings,
    SysctlResult,
    apply_conntrack_sysctls,
    conntrack_max,
    node_cpus,
)

# A fresh kernel's values (nf_conntrack_max and hashsize as on a small machine).
KERNEL = {
    "nf_conntrack_max": 65536,
    "nf_conntrack_tcp_timeout_established": 432000,
    "nf_conntrack_tcp_timeout_close_wait": 60,
    "nf_conntrack_tcp_be_liberal": 0,
    "nf_conntrack_udp_timeout": 30,
    "nf_conntrack_udp_timeout_stream": 120,
}


class Tree:
    """A /proc/sys with net/netfilter's conntrack entries, and the module's hashsize."""

    def __init__(self, root: Path, hashsize: int = 16384, **values: int) -> None:
        self.proc_sys = root / "proc" / "sys"
        self.netfilter = self.proc_sys / "net" / "netfilter"
        self.netfilter.mkdir(parents=True)
        self.hashsize = root / "hashsize"
        self.hashsize.write_text(f"{hashsize}\n")
        for name, value in {**KERNEL, **values}.items():
            (self.netfilter / name).write_text(f"{value}\n")

    def __getitem__(self, name: str) -> int:
        path = self.hashsize if name == "hashsize" else self.netfilter / name
        return int(path.read_text())

    def apply(self, settings: ConntrackSettings, cpus: int = 2) -> list[SysctlResult]:
        return apply_conntrack_sysctls(
            settings, proc_sys=self.proc_sys, hashsize=self.hashsize, cpus=cpus
        )


def test_kube_proxys_defaults_on_a_fresh_kernel(tmp_path: Path) -> None:
    tree = Tree(tmp_path)

    results = tree.apply(ConntrackSettings(), cpus=2)

    # 32768 x 2 CPUs is under --conntrack-min: the min wins; hashsize follows at max/4.
    assert results == [
        SysctlResult("nf_conntrack_max", 131072, 65536, "set"),
        SysctlResult("hashsize", 32768, 16384, "set"),
        SysctlResult("nf_conntrack_tcp_timeout_established", 86400, 432000, "set"),
        SysctlResult("nf_conntrack_tcp_timeout_close_wait", 3600, 60, "set"),
    ]
    assert tree["nf_conntrack_max"] == 131072
    assert tree["hashsize"] == 32768
    assert tree["nf_conntrack_tcp_timeout_established"] == 86400
    assert tree["nf_conntrack_tcp_timeout_close_wait"] == 3600
    # Left alone by default.
    assert tree["nf_conntrack_tcp_be_liberal"] == 0
    assert tree["nf_conntrack_udp_timeout"] == 30
    assert tree["nf_conntrack_udp_timeout_stream"] == 120


def test_the_max_and_hashsize_are_only_ever_raised(tmp_path: Path) -> None:
    tree = Tree(tmp_path, hashsize=262144, nf_conntrack_max=1_000_000)

    results = tree.apply(ConntrackSettings(), cpus=2)

    assert results[:2] == [
        SysctlResult("nf_conntrack_max", 131072, 1_000_000, "unchanged"),
        SysctlResult("hashsize", 32768, 262144, "unchanged"),
    ]
    assert (tree["nf_conntrack_max"], tree["hashsize"]) == (1_000_000, 262144)


def test_timeouts_are_set_to_the_value_up_or_down_and_unchanged_when_equal(
    tmp_path: Path,
) -> None:
    tree = Tree(tmp_path, nf_conntrack_tcp_timeout_established=86400)

    results = tree.apply(ConntrackSettings(max_per_core=0, tcp_close_wait_timeout=30.0), cpus=2)

    assert results == [
        SysctlResult("nf_conntrack_tcp_timeout_established", 86400, 86400, "unchanged"),
        SysctlResult("nf_conntrack_tcp_timeout_close_wait", 30, 60, "set"),
    ]
    assert tree["nf_conntrack_tcp_timeout_close_wait"] == 30


def test_max_per_core_0_leaves_the_max_and_hashsize_and_zero_timeouts_are_left(
    tmp_path: Path,
) -> None:
    tree = Tree(tmp_path)

    results = tree.apply(
        ConntrackSettings(max_per_core=0, tcp_established_timeout=0, tcp_close_wait_timeout=0)
    )

    assert results == []
    assert (tree["nf_conntrack_max"], tree["hashsize"]) == (65536, 16384)
    assert tree["nf_conntrack_tcp_timeout_established"] == 432000


def test_be_liberal_and_the_udp_timeouts_when_asked(tmp_path: Path) -> None:
    tree = Tree(tmp_path)

    tree.apply(
        ConntrackSettings(
            max_per_core=0, tcp_be_liberal=True, udp_timeout=60.0, udp_stream_timeout=180.9
        )
    )

    assert tree["nf_conntrack_tcp_be_liberal"] == 1
    assert tree["nf_conntrack_udp_timeout"] == 60
    assert tree["nf_conntrack_udp_timeout_stream"] == 180, "whole seconds, as Go divides"


@pytest.mark.parametrize(
    ("per_core", "minimum", "cpus", "expected"),
    [
        (32768, 131072, 2, 131072),  # under the min: the min
        (32768, 131072, 8, 262144),  # over it: scaled
        (32768, 0, 1, 32768),
        (32768, 131072, 64, MAX_SCALED),  # 2M capped at 1M, whatever the min
        (32768, 4_000_000, 64, MAX_SCALED),
        (0, 131072, 8, 0),  # 0: leave the max
    ],
)
def test_the_max_is_max_per_core_times_cpus_at_least_min_capped(
    per_core: int, minimum: int, cpus: int, expected: int
) -> None:
    settings = ConntrackSettings(max_per_core=per_core, min=minimum)
    assert conntrack_max(settings, cpus) == expected


def test_a_sysctl_that_cannot_be_written_is_a_warning_and_the_rest_are_set(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tree = Tree(tmp_path)
    # Not writable: a directory where the value should be (root ignores file modes; in a
    # lab namespace the kernel refuses nf_conntrack_max with EACCES), and a missing one
    # (the module's sysctls absent).
    (tree.netfilter / "nf_conntrack_max").unlink()
    (tree.netfilter / "nf_conntrack_max").mkdir()
    (tree.netfilter / "nf_conntrack_tcp_timeout_close_wait").unlink()

    with caplog.at_level(logging.WARNING, logger="pykp.netfilter.conntrack_sysctls"):
        results = tree.apply(ConntrackSettings())

    assert [(r.name, r.outcome) for r in results] == [
        ("nf_conntrack_max", "failed"),  # and hashsize is not raised for a max not set
        ("nf_conntrack_tcp_timeout_established", "set"),
        ("nf_conntrack_tcp_timeout_close_wait", "failed"),
    ]
    assert results[0].found is None and results[0].error
    assert tree["hashsize"] == 16384
    assert tree["nf_conntrack_tcp_timeout_established"] == 86400
    assert not (tree.netfilter / "nf_conntrack_tcp_timeout_close_wait").exists(), "never created"
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2 and all(m.startswith("cannot set nf_conntrack_") for m in messages)
    assert "left at an unreadable value" in messages[0]


@pytest.mark.parametrize(
    ("text", "count"), [("0-1\n", 2), ("0\n", 1), ("0-3,8,10-11\n", 7), ("", None), ("x", None)]
)
def test_the_node_cpus_are_read_from_sysfs(tmp_path: Path, text: str, count: int | None) -> None:
    import os

    online = tmp_path / "online"
    online.write_text(text)
    assert node_cpus(online) == (count if count is not None else os.cpu_count())
    assert node_cpus(tmp_path / "missing") == os.cpu_count()
