"""The emulated cluster (benchmarks/cluster.py) and its comparison job, at toy size, as a user runs them.

Needs root (network namespaces); where namespaces cannot be created, every test here is skipped with the reason.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import cluster  # noqa: E402  (benchmarks/ is not a package)
import cluster_compare  # noqa: E402

# one xdist worker for every test of the harness: "no namespace is left" must not see another test's cluster
pytestmark = pytest.mark.xdist_group("cluster")

ok, why = cluster.can_create_namespaces()
needs_namespaces = pytest.mark.skipif(not ok, reason=f"cannot create network namespaces: {why}")

COMPARE = [sys.executable, str(ROOT / "benchmarks" / "cluster_compare.py")]


@pytest.mark.slow  # a fresh interpreter running the harness
def test_help_says_it_needs_root() -> None:
    out = subprocess.run(COMPARE + ["--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    assert "Needs root: it creates network namespaces, veth pairs and tc qdiscs (CAP_NET_ADMIN, CAP_SYS_ADMIN)" in text


def test_repeated_launches_rotate_the_order_and_rows_take_the_median_launch() -> None:
    plan = cluster_compare.launch_order(["a", "b", "c"], 3)
    assert plan == [(0, "a"), (0, "b"), (0, "c"), (1, "b"), (1, "c"), (1, "a"), (2, "c"), (2, "a"), (2, "b")]
    assert cluster_compare.launch_order(["a", "b"], 1) == [(0, "a"), (0, "b")]
    assert cluster_compare.median_run([300.0, 210.0, 250.0]) == 2
    assert cluster_compare.median_run([300.0, 210.0]) == 1  # of two middles, the lower
    assert cluster_compare.median_run([5.0, 5.0, 4.0, 9.0]) == 0  # ties: the earlier launch
    assert cluster_compare.median_run([7.0]) == 0
    with pytest.raises(ValueError, match="repeat=0"):
        cluster_compare.launch_order(["a"], 0)
    with pytest.raises(ValueError, match="iter_ms"):
        cluster_compare.median_run([])


def _ours(pid: int) -> list[str]:
    return [ns for ns in cluster.namespaces() if ns.startswith(f"{cluster.PREFIX}{pid}-")]


def _in_namespaces(pid: int) -> list[int]:
    return [p for ns in _ours(pid) for p in cluster.namespace_pids(ns)]


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain ``text`` (zombies have none and are not counted)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmd:
                found.append(f"{proc.name}: {cmd}")
    return found


@pytest.mark.slow
@needs_namespaces
@pytest.mark.timeout(60)
def test_links_are_shaped_to_the_rate_asked_for_and_everything_is_removed() -> None:
    with pytest.raises(ValueError, match=re.escape("Invalid queue_ms=0. Must be > 0.")):
        cluster.Cluster(hosts=2, rate="1gbit", queue_ms=0)
    with cluster.Cluster(hosts=3, rate="100mbit", queue_ms=35) as c:
        names = _ours(os.getpid())
        assert sorted(names) == sorted([c.bridge_ns] + [h.netns for h in c.hosts])
        # every host link's queue holds packets for at most the queue_ms asked for (tbf's latency)
        qdisc = subprocess.run(c.hosts[0].argv(["tc", "qdisc", "show", "dev", "eth0"]), capture_output=True,
                               text=True).stdout
        assert "tbf" in qdisc and "lat 35ms" in qdisc, qdisc
        measured = c.measure_rate(src=2, dst=0, seconds=1.0)
        # TCP goodput over Ethernet framing is ~95% of the link rate; tbf must not let more through.
        assert 0.85 * 100e6 < measured < 1.0 * 100e6, measured
        # No host has a route out of the cluster: only the /24 of its own link.
        routes = subprocess.run(c.hosts[0].argv(["ip", "route"]), capture_output=True, text=True).stdout
        expected = f"{cluster.SUBNET}.0/24 dev eth0 proto kernel scope link src {cluster.SUBNET}.1"
        assert routes.split() == expected.split()
        # The same host's own address goes over lo, not over the shaped link (how P ranks per host talk).
        h = c.hosts[1]
        before, lo_before = h.counters(), h.counters("lo")
        local_rate = c.measure_rate(src=1, dst=1, seconds=0.5)
        assert local_rate > 3 * 100e6  # not limited by the link
        assert h.counters()["tx_bytes"] - before["tx_bytes"] < 1000
        assert h.counters("lo")["tx_bytes"] - lo_before["tx_bytes"] > local_rate / 8 * 0.5 * 0.9
    assert _ours(os.getpid()) == []


@pytest.mark.slow
@needs_namespaces
@pytest.mark.timeout(60)
def test_hosts_run_the_congestion_control_asked_for_or_the_machines() -> None:
    default = Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    with pytest.raises(ValueError, match=re.escape("Invalid tcp_cc='no-such-cc'. This kernel has")):
        cluster.Cluster(hosts=2, rate="1gbit", tcp_cc="no-such-cc")
    with cluster.Cluster(hosts=2, rate="1gbit") as c:
        assert c.tcp_cc() == default
    # reno is always built in and allowed; any other allowed one would do as long as it is not the default
    other = sorted(cluster.allowed_tcp_cc() - {default})
    if other:
        with cluster.Cluster(hosts=2, rate="1gbit", tcp_cc=other[0]) as c:
            assert c.tcp_cc() == other[0]
            for h in c.hosts:
                out = subprocess.run(h.argv(["sysctl", "-n", "net.ipv4.tcp_congestion_control"]),
                                     capture_output=True, text=True).stdout.strip()
                assert out == other[0]
    restricted = sorted(cluster.available_tcp_cc() - cluster.allowed_tcp_cc())
    if restricted:  # built but not allowed in a namespace: a clear error that says how to allow it
        with pytest.raises(cluster.ClusterError, match="net.ipv4.tcp_allowed_congestion_control"):
            with cluster.Cluster(hosts=2, rate="1gbit", tcp_cc=restricted[0]):
                pass
    assert _ours(os.getpid()) == []


@pytest.mark.slow
@needs_namespaces
@pytest.mark.timeout(300)
def test_toy_comparison_runs_every_method_over_the_shaped_links(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.Popen(
        COMPARE + ["--hosts", "2", "--procs-per-host", "1", "--rate", "1gbit", "--workload", "mlp", "--steps", "6",
                   "--evals", "2", "--methods", "ddp", "one-peer-exp", "--repeat", "2", "--no-progress",
                   "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    stdout, stderr = proc.communicate(timeout=290)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    cfg, rows = summary["config"], {r["method"]: r for r in summary["results"]}
    assert list(rows) == ["ddp", "one-peer-exp"]
    assert cfg["repeat"] == 2
    # Two launches per method, in rotated orders (ddp, one-peer-exp, then one-peer-exp, ddp), each in its own
    # directory; the row is the lower-median launch's, and both launches reached the same losses.
    assert sorted(p.name for p in (out / "runs" / "ddp").iterdir()) == ["0", "1"]
    assert (out / "runs" / "one-peer-exp" / "1" / "rank1.json").exists()
    for r in rows.values():
        assert len(r["iter_ms_runs"]) == 2 and r["iter_ms"] == min(r["iter_ms_runs"])
        assert r["same_val_loss_in_every_run"] is True
    assert cfg["tcp_cc"] == Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    assert 0.5e9 < cfg["measured_rate"] < 1e9  # loose below: at 1 Gbit/s a loaded CPU can limit the stream
    for method, r in rows.items():
        curve = summary["curves"][method]
        assert [p[0] for p in curve] == [0, 3, 6], method
        assert all(0 < p[2] < 10 for p in curve), (method, curve)  # finite validation losses
        assert curve[0][2] == summary["curves"]["ddp"][0][2]  # same initial model, same validation data
        assert r["iter_ms"] > 0 and r["train_s"] > 0
        # 2 hosts: a DDP ring all-reduce and a one-peer exchange both send the whole model once a step.
        assert 0.95 < r["wire_x_model"] < 1.15, (method, r["wire_x_model"])
        assert r["local_bytes_per_host_step"] < 1e4  # one rank per host: nothing between local ranks
        # the host's own TCP retransmissions (its namespace's /proc/net/snmp), a count per step
        assert isinstance(r["tcp_retrans_per_host_step"], float) and r["tcp_retrans_per_host_step"] >= 0
        # CPU over the 6 steps: the machine's (/proc/stat) holds both ranks' own (os.times), to within the
        # 10 ms ticks both count in
        ranks_ms = 2 * (r["cpu_user_ms_per_rank_step"] + r["cpu_system_ms_per_rank_step"]) * 6
        assert ranks_ms > 0 and r["machine_busy_ms_per_step"] * 6 >= ranks_ms - 100, (method, r)
        assert 0 <= r["machine_softirq_ms_per_step"] <= r["machine_busy_ms_per_step"]
    assert "Target validation loss" in stdout and "one-peer-exp" in stdout
    for png in ("val_loss_vs_time.png", "val_loss_vs_step.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _ours(proc.pid) == []


@needs_namespaces
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_toy_comparison_runs_the_slow_link_anchors(tmp_path: Path) -> None:
    out = tmp_path / "anchors"
    methods = ["ddp", "ddp-powersgd-r1-s2", "localsgd-8-w0", "diloco-4-lr3e-4"]
    proc = subprocess.Popen(
        COMPARE + ["--hosts", "2", "--rate", "1gbit", "--workload", "mlp", "--steps", "16", "--evals", "2",
                   "--methods", *methods, "--no-progress", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    stdout, stderr = proc.communicate(timeout=390)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["method"]: r for r in summary["results"]}
    assert list(rows) == methods
    for method, r in rows.items():
        curve = summary["curves"][method]
        assert [p[0] for p in curve] == [0, 8, 16], method
        assert curve[-1][2] < curve[0][2], (method, curve)  # every method trains
        assert r["iter_ms"] > 0 and r["local_bytes_per_host_step"] < 1e4
    ddp = rows["ddp"]["wire_bytes_per_host_step"]
    assert rows["ddp"]["setup"] is None and rows["ddp"]["period"] == 1
    # PowerSGD: 2 plain all-reduce steps of 16, then rank-1 factors: about 2/16 of DDP's bytes, not much more.
    assert 0.1 < rows["ddp-powersgd-r1-s2"]["wire_bytes_per_host_step"] / ddp < 0.2
    assert "rank 1, start_powerSGD_iter 2" in rows["ddp-powersgd-r1-s2"]["setup"]
    # Post-local SGD without warm-up: one parameter all-reduce (DDP's bytes) every 8 steps; no gradient traffic.
    assert 0.1 < rows["localsgd-8-w0"]["wire_bytes_per_host_step"] / ddp < 0.15
    assert rows["localsgd-8-w0"]["period"] == 8 and rows["localsgd-8-w0"]["iter_window"] == [8, 16]
    # DiLoCo: one pseudo-gradient all-reduce every 4 steps.
    assert 0.22 < rows["diloco-4-lr3e-4"]["wire_bytes_per_host_step"] / ddp < 0.28
    assert "inner AdamW lr 0.0003" in rows["diloco-4-lr3e-4"]["setup"]
    assert rows["diloco-4-lr3e-4"]["iter_window"] == [4, 16]
    assert _ours(proc.pid) == []


def _start(out: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        COMPARE + ["--hosts", "2", "--workload", "mlp", "--steps", "100000", "--methods", "ring", "--no-progress",
                   "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(proc: subprocess.Popen[str], ready: Callable[[], bool], what: str, within: float = 150.0) -> None:
    deadline = time.monotonic() + within
    while not ready():
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert time.monotonic() < deadline, f"{what} did not happen within {within} s"
        time.sleep(0.1)


def _assert_gone_soon(pid: int, out: Path, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while _ours(pid) or _processes_mentioning(str(out)):
        assert time.monotonic() < deadline, (_ours(pid), _processes_mentioning(str(out)))
        time.sleep(0.1)


@pytest.mark.slow
@needs_namespaces
@pytest.mark.timeout(200)
def test_killed_harness_leaves_no_namespaces_or_processes(tmp_path: Path) -> None:
    out = tmp_path / "killed"
    proc = _start(out)
    progress = out / "runs" / "ring" / "progress"
    _wait_for(proc, lambda: progress.exists() and progress.read_text().strip() != "", "the first training step")
    assert len(_ours(proc.pid)) == 3
    assert len(_in_namespaces(proc.pid)) >= 4  # 2 torchrun agents and 2 workers, inside the namespaces
    proc.send_signal(signal.SIGKILL)  # no handler runs: the cleaner process must do the teardown
    proc.wait()
    _assert_gone_soon(proc.pid, out)


@pytest.mark.slow
@needs_namespaces
@pytest.mark.timeout(200)
def test_ctrl_c_tears_down_and_exits_nonzero(tmp_path: Path) -> None:
    out = tmp_path / "interrupted"
    proc = _start(out)
    _wait_for(proc, lambda: bool(_in_namespaces(proc.pid)), "the torchrun launch")  # a start is enough
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) != 0
    _assert_gone_soon(proc.pid, out)


@pytest.mark.slow  # a fresh interpreter running the harness
@needs_namespaces
@pytest.mark.timeout(60)
def test_without_net_admin_it_says_so_and_exits_nonzero() -> None:
    # Root without CAP_NET_ADMIN / CAP_SYS_ADMIN (as in an unprivileged container): the capabilities are
    # dropped from the bounding set, so the child runs without them.
    if subprocess.run(["setpriv", "--version"], capture_output=True).returncode != 0:
        pytest.skip("setpriv (util-linux) is not installed")
    proc = subprocess.Popen(["setpriv", "--bounding-set", "-net_admin,-sys_admin", "--inh-caps",
                             "-net_admin,-sys_admin", *COMPARE, "--hosts", "2", "--steps", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=50)
    assert proc.returncode == 2, err
    assert "needs root" in err and "CAP_NET_ADMIN" in err and "sudo" in err
    assert _ours(proc.pid) == []


@pytest.mark.slow  # a fresh interpreter running the harness
@pytest.mark.timeout(60)
def test_an_unknown_congestion_control_is_refused_before_anything_is_built() -> None:
    proc = subprocess.Popen([*COMPARE, "--hosts", "2", "--steps", "2", "--tcp-cc", "no-such-cc"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=50)
    assert proc.returncode == 2, err
    known = " ".join(sorted(cluster.available_tcp_cc()))
    assert f"--tcp-cc no-such-cc: this kernel has {known}" in err
    assert _ours(proc.pid) == []
