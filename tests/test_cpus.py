"""`grifo.cpus.available_cpus`: the affinity's CPUs, capped by the control group's CPU quota
(read from fake cgroup trees here), and `grifo serve --workers auto` using it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from grifo.cpus import available_cpus, cpu_quota
from tests.support.fabric import CHAT, topology_yaml
from tests.support.processes import serve_with_banner


def _tree(root: Path, files: dict[str, str], membership: str) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    member = root / "proc-self-cgroup"
    member.write_text(membership)
    return member


def test_a_v2_quota_in_the_group_rounds_up(tmp_path: Path) -> None:
    member = _tree(tmp_path, {"app/cpu.max": "150000 100000\n"}, "0::/app\n")
    assert cpu_quota(tmp_path, member) == 2  # 1.5 CPUs: more than one


def test_no_quota_is_none(tmp_path: Path) -> None:
    member = _tree(tmp_path, {"app/cpu.max": "max 100000\n"}, "0::/app\n")
    assert cpu_quota(tmp_path, member) is None
    assert available_cpus(tmp_path, member) == len(os.sched_getaffinity(0))


def test_the_tightest_group_on_the_way_up_holds(tmp_path: Path) -> None:
    files = {
        "outer/cpu.max": "100000 100000\n",  # one CPU for everything under it
        "outer/inner/cpu.max": "400000 100000\n",
    }
    member = _tree(tmp_path, files, "0::/outer/inner\n")
    assert cpu_quota(tmp_path, member) == 1
    assert available_cpus(tmp_path, member) == 1


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    files = {"cpu/box/cpu.cfs_quota_us": "300000\n", "cpu/box/cpu.cfs_period_us": "100000\n"}
    member = _tree(tmp_path, files, "5:memory:/box\n4:cpu,cpuacct:/box\n0::/\n")
    assert cpu_quota(tmp_path, member) == 3


def test_cgroup_v1_without_quota(tmp_path: Path) -> None:
    files = {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}
    member = _tree(tmp_path, files, "4:cpu,cpuacct:/\n")
    assert cpu_quota(tmp_path, member) is None


def test_unreadable_or_garbled_files_mean_no_quota(tmp_path: Path) -> None:
    assert cpu_quota(tmp_path, tmp_path / "missing") is None
    member = _tree(tmp_path, {"app/cpu.max": "lots\n"}, "garbage\n0::/app\n")
    assert cpu_quota(tmp_path, member) is None


def test_a_quota_above_the_affinity_does_not_raise_the_count(tmp_path: Path) -> None:
    member = _tree(tmp_path, {"cpu.max": "6400000 100000\n"}, "0::/\n")
    assert cpu_quota(tmp_path, member) == 64
    assert available_cpus(tmp_path, member) == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_serve_refuses_a_bad_worker_count(value: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "grifo", "serve", "--workers", value],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--workers" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_workers_auto_starts_one_per_available_cpu(tmp_path: Path) -> None:
    config = tmp_path / "grifo.yaml"
    config.write_text(topology_yaml())
    expected = available_cpus()
    proc, port, banner = serve_with_banner(config, tmp_path / "state", workers="auto")
    try:
        if expected > 1:
            assert f"({expected} gateway processes)" in banner
        else:
            assert "gateway processes" not in banner
        key = json.loads((tmp_path / "state" / "demo-keys.json").read_text())["demo-global"]
        body = json.dumps({"model": CHAT, "messages": [{"role": "user", "content": "hi"}]})
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=body.encode(),
            headers={"authorization": f"Bearer {key}"},
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert resp.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            metrics = resp.read().decode()
        if expected > 1:  # every worker answered the merged scrape
            assert f'grifo_scrape_workers{{state="merged"}} {float(expected)}' in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        if proc.stdout is not None:
            proc.stdout.close()
