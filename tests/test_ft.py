"""Gossip over a torchft Manager (decent_optim_wrapper.ft): replicas die, survivors go on, a replica rejoins.

Each test starts torchft's lighthouse on 127.0.0.1 (tests/ft_lighthouse.py) and one process per replica
(tests/ft_worker.py); a replica killed with SIGKILL dies for real. With ``lr = 0`` and integer starting values
every pair average is exact in float64, so the survivors' mean is compared at ``rtol=atol=0`` with the value it
must keep: their mean right after the last round the dead replica confirmed. With ``lr > 0`` and no failure, the
run is compared with DecentOptimWrapper over a plain gloo world (the engine every other test checks), bit for bit.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("torchft", reason="torchft is not installed: uv sync --group ft-dev")

from harness import free_port, run_ranks  # noqa: E402

from decent_optim_wrapper import DecentOptimWrapper  # noqa: E402

WORKER = Path(__file__).with_name("ft_worker.py")
LIGHTHOUSE = Path(__file__).with_name("ft_lighthouse.py")
HEARTBEAT_MS = 1000
pytestmark = pytest.mark.timeout(300)
# The drills start a lighthouse and 3-5 processes that import torch (10-40 s each): not in the fast lane.
drill = pytest.mark.slow


def _lighthouse(port: int) -> subprocess.Popen[bytes]:
    """torchft's lighthouse on 127.0.0.1:``port``, accepting connections when this returns (see ft_lighthouse.py:
    it starts in milliseconds, so the time it is down is the time a test says)."""
    args = ["--min_replicas", "1", "--join_timeout_ms", "1000", "--heartbeat_timeout_ms", str(HEARTBEAT_MS),
            "--quorum_tick_ms", "50", "--bind", f"127.0.0.1:{port}"]
    proc = subprocess.Popen([sys.executable, str(LIGHTHOUSE), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "RUST_LOG": "error"})
    end = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            if proc.poll() is not None or time.time() > end:
                proc.kill()
                raise RuntimeError(f"the lighthouse did not listen on port {port} (exit code {proc.wait()})") from None
            time.sleep(0.01)


class Cluster:
    """A lighthouse and replica processes; everything is killed on exit, whatever happened."""

    def __init__(self, tmp: Path, replicas: int, **kw: Any) -> None:
        self.tmp, self.n, self.kw = tmp, replicas, kw
        self.port = free_port()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.lighthouse = _lighthouse(self.port)

    def start(self, replica: int, *extra: str, joiner: bool = False) -> subprocess.Popen[bytes]:
        args = [sys.executable, str(WORKER), "--replica", str(replica), "--replicas", str(self.n), "--lighthouse",
                f"http://127.0.0.1:{self.port}", "--out", str(self.tmp)]
        for k, v in self.kw.items():
            args += [f"--{k.replace('_', '-')}", str(v)]
        args += list(extra) + (["--joiner"] if joiner else [])
        env = {**os.environ, "RUST_LOG": "error", "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(WORKER.parent)}
        log = open(self.tmp / f"log-{replica}-{len(self.procs)}.txt", "wb")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.procs.append(proc)
        return proc

    def wait_for_step(self, replica: int, step: int, timeout: float = 90) -> None:
        """Until ``replica`` has taken ``step`` steps (it writes its count after each)."""
        f, end = self.tmp / f"step-{replica}", time.time() + timeout
        while not (f.exists() and f.read_text().isdigit() and int(f.read_text()) >= step):
            if time.time() > end:
                raise TimeoutError(f"replica {replica} did not reach step {step}:\n{self.logs()}")
            time.sleep(0.05)

    def restart_lighthouse(self, down_s: float) -> None:
        self.lighthouse.kill()
        self.lighthouse.wait()
        time.sleep(down_s)
        self.lighthouse = _lighthouse(self.port)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        for p in [*self.procs, self.lighthouse]:
            if p.poll() is None:
                p.kill()
            p.wait()

    def wait(self, timeout: float = 150) -> list[int]:
        end = time.time() + timeout
        for p in self.procs:
            p.wait(max(1.0, end - time.time()))
        return [p.returncode for p in self.procs]

    def logs(self) -> str:
        logs = sorted(self.tmp.glob("log-*"))
        return "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-3000:]}" for f in logs)

    def results(self) -> dict[int, dict[str, Any]]:
        """The replicas that finished, by replica (a restarted one: its second life)."""
        out: dict[int, dict[str, Any]] = {}
        for f in sorted(self.tmp.glob("*-*.pt")):
            res = torch.load(f, weights_only=False)
            if res["replica"] not in out or res["joiner"]:
                out[res["replica"]] = res
        return out


def _params_at(res: dict[str, Any], step: int) -> torch.Tensor:
    return next(r["params"] for r in res["records"] if r["step"] == step)


def _check_survivors_mean(results: dict[int, dict[str, Any]], survivors: list[int], since: int) -> None:
    """The survivors' mean at the end equals their mean after step ``since`` (lr = 0), to the last bit."""
    before = torch.stack([_params_at(results[r], since) for r in survivors]).sum(0)
    after = torch.stack([results[r]["final"] for r in survivors]).sum(0)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


@drill
@pytest.mark.parametrize("replicas", [3, 4])
@pytest.mark.parametrize("where", ["between", "round"])
def test_a_killed_replica_leaves_the_survivors_mean_exact(tmp_path: Path, replicas: int, where: str) -> None:
    die_at = 5  # it dies while ending round 4: ring pairs it with replica 2 (of 3) or replica 0 (of 4) there
    with Cluster(tmp_path, replicas, steps=14, topology="ring") as cluster:  # weights 1/2 for 2, 3 and 4 members
        for r in range(replicas):
            cluster.start(r, *(["--die", f"{die_at}:{where}"] if r == 1 else []))
        codes = cluster.wait()
        assert codes[1] == -signal.SIGKILL, cluster.logs()
        assert [c for i, c in enumerate(codes) if i != 1] == [0] * (replicas - 1), cluster.logs()
        results = cluster.results()
    survivors = [r for r in range(replicas) if r != 1]
    # The replica dies in its step die_at + 1, which begins by ending the round launched in step die_at.
    # "between": that round ended on both sides before the kill, so the mean to keep is the survivors' mean
    # after it (their records of step die_at + 1). "round": the dead replica never confirmed it, so its peer
    # must drop it: the mean to keep is the survivors' mean before it (records of step die_at); had the peer
    # applied it, the sum would have moved by half the difference with the dead replica.
    _check_survivors_mean(results, survivors, die_at + 1 if where == "between" else die_at)
    peer = 2 if replicas == 3 else 0
    for r in survivors:
        records = results[r]["records"]
        assert records[-1]["n"] == replicas - 1 and records[0]["n"] == replicas
        assert results[r]["stats"].quorums == 2
        # only the dead replica's peer in that round drops a round, and only if it was never confirmed
        assert results[r]["stats"].dropped == (1 if where == "round" and r == peer else 0)


@drill
def test_a_death_whose_close_never_arrives_is_seen_by_the_liveness_probe(tmp_path: Path) -> None:
    """The dead replica's connections stay open (a child holds them: as when its FIN is lost on a congested link),
    so gloo never tells its peer; the peer's wait asks the dead replica's liveness port, is refused, and drops the
    round at once. Without the probe it would wait out its timeout (20 s), miss the next quorum and heal from a
    survivor, losing its own state (the mean check and heals == 0 would fail)."""
    replicas, die_at = 4, 5
    holder = tmp_path / "holder-1"
    try:
        with Cluster(tmp_path, replicas, steps=14, topology="ring") as cluster:
            for r in range(replicas):
                cluster.start(r, *(["--die", f"{die_at}:silent"] if r == 1 else []))
            codes = cluster.wait()
            assert codes == [0, -signal.SIGKILL, 0, 0], cluster.logs()
            results = cluster.results()
    finally:
        if holder.exists():
            os.kill(int(holder.read_text()), signal.SIGKILL)
    assert holder.exists()  # the connections were held open
    _check_survivors_mean(results, [0, 2, 3], die_at)
    for r in (0, 2, 3):
        assert results[r]["stats"].heals == 0 and results[r]["stats"].quorums == 2
        times = [x["time"] for x in results[r]["records"]]
        assert max(b - a for a, b in zip(times, times[1:])) < HEARTBEAT_MS / 1000 + 3  # not the 20 s timeout
    assert results[0]["stats"].dropped == 1  # ring pairs replica 1 with replica 0 in round 4 (of 4)


@drill
@pytest.mark.parametrize("seed", [2])  # seed 2 of this drill once crashed two survivors (a failed reconfigure)
def test_random_kills_at_random_times_leave_every_replica_running(tmp_path: Path, seed: int) -> None:
    """Three SIGKILLs at random times (inside a quorum, a heal, a round, a step: wherever they land), each replica
    restarted at once as its torchrun would: every life that was not killed ends with exit code 0 at the step
    budget, and nobody hangs. (A death while the group reconfigures used to crash the survivors: torchft's
    process group is left unconfigured and the next collective asserts; the quorum is now asked for again.)"""
    import random

    rng, replicas, steps = random.Random(seed), 4, 80
    with Cluster(tmp_path, replicas, steps=steps, topology="ring", step_time=0.1, timeout=15, lr=0.05) as cluster:
        live = {r: cluster.start(r) for r in range(replicas)}
        killed = []
        cluster.wait_for_step(0, 5)
        for _ in range(3):
            time.sleep(rng.uniform(0.5, 3.0))
            victim = rng.randrange(replicas)
            if live[victim].poll() is not None:
                continue
            os.kill(live[victim].pid, signal.SIGKILL)
            live[victim].wait()
            killed.append(live[victim])
            (tmp_path / f"ready-{victim}").unlink(missing_ok=True)
            live[victim] = cluster.start(victim, joiner=True)
        cluster.wait(200)
        assert killed and all(p.returncode == -signal.SIGKILL for p in killed)
        assert all(p.returncode == 0 for p in live.values()), cluster.logs()
        results = cluster.results()
    assert sorted(results) == list(range(replicas))
    assert all(results[r]["records"][-1]["step"] == steps for r in range(replicas))


@drill
@pytest.mark.parametrize("wire", ["", "bfloat16"])
def test_without_failures_it_is_the_plain_wrapper_bit_for_bit(tmp_path: Path, wire: str) -> None:
    steps, replicas = 12, 4
    extra = {"wire_dtype": wire} if wire else {}
    with Cluster(tmp_path, replicas, steps=steps, lr=0.05, topology="one-peer-exp", **extra) as cluster:
        for r in range(replicas):
            cluster.start(r, "--consensus")
        assert cluster.wait() == [0] * replicas, cluster.logs()
        results = cluster.results()
    expected = run_ranks(_plain_run, replicas, steps, getattr(torch, wire) if wire else None)
    for r in range(replicas):
        torch.testing.assert_close(results[r]["final"], expected[r], rtol=0, atol=0)
        assert results[r]["stats"].applied == steps and results[r]["stats"].dropped == 0
    # consensus_distance() over the members, against its definition computed here from every replica's values
    finals = torch.stack([results[r]["final"] for r in range(replicas)])
    spread = float(((finals - finals.mean(0)) ** 2).sum(1).mean().sqrt())
    assert spread > 0 and all(results[r]["consensus"] == pytest.approx(spread, rel=1e-9) for r in range(replicas))


def _plain_run(rank: int, world_size: int, steps: int, wire: torch.dtype | None) -> torch.Tensor:
    """The oracle: the same replicas as ranks of one gloo world, with the plain wrapper."""
    sys.path.insert(0, str(WORKER.parent))
    import ft_worker

    model = ft_worker.model_for(rank, 0.05)
    opt = DecentOptimWrapper(torch.optim.SGD(model.parameters(), lr=0.05), topology="one-peer-exp", wire_dtype=wire)
    for step in range(steps):
        opt.zero_grad()
        x, y = ft_worker.batch(rank, step)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    opt.finish()
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()


@drill
@pytest.mark.parametrize("replicas", [3, 4])
def test_a_killed_replica_rejoins_heals_from_a_peer_and_the_mean_is_what_it_brought(tmp_path: Path,
                                                                                     replicas: int) -> None:
    steps = 40
    survivors = [r for r in range(replicas) if r != 1]
    # 0.3 s a step: the restarted replica takes a few seconds to import torch and build its model
    with Cluster(tmp_path, replicas, steps=steps, topology="ring", step_time=0.3) as cluster:
        for r in range(replicas):
            cluster.start(r, *(["--die", "5:round"] if r == 1 else []))
        cluster.procs[1].wait(150)
        assert cluster.procs[1].returncode == -signal.SIGKILL, cluster.logs()
        # The others wait between two steps until the restarted replica is built (starting torch takes seconds,
        # more on a loaded machine), so that it joins while they still train, whatever the machine's speed.
        (tmp_path / "hold").touch()
        (tmp_path / "ready-1").unlink()  # its first life's
        cluster.start(1, joiner=True)  # as its own `torchrun --max-restarts` would
        while not (tmp_path / "ready-1").exists() and cluster.procs[-1].poll() is None:
            time.sleep(0.05)
        (tmp_path / "hold").unlink()
        codes = cluster.wait()
        assert codes[1] == -signal.SIGKILL and codes[:1] + codes[2:] == [0] * replicas, cluster.logs()
        results = cluster.results()
    joiner = results[1]
    assert joiner["stats"].heals == 1 and joiner["records"][-1]["step"] == steps
    first = joiner["records"][0]
    at = first["step"]
    # It entered with a copy of a live replica's parameters at that step (its source's), and took no step of
    # its own: with lr = 0 its record after the step it healed in is exactly one survivor's record.
    sources = [r for r in survivors if torch.equal(_params_at(results[r], at), first["params"])]
    assert len(sources) >= 1, "the joiner's parameters are nobody's"
    # From then on all replicas average again: their sum is the survivors' sum at that step plus what the
    # joiner brought (pair averages keep every pair's sum).
    before = torch.stack([_params_at(results[r], at) for r in survivors] + [first["params"]]).sum(0)
    after = torch.stack([results[r]["final"] for r in range(replicas)]).sum(0)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert all(results[r]["records"][-1]["n"] == replicas for r in range(replicas))
    assert all(results[r]["stats"].quorums == 3 for r in survivors)  # n, then n - 1, then n members


@drill
def test_two_kills_in_a_row(tmp_path: Path) -> None:
    # Replica 1 dies between rounds at its step 6; in the quorum of three that follows (replica 3 is rank 2 of
    # 3), ring pairs replica 3 with replica 0 in round 5, and replica 3 dies inside it, unconfirmed.
    replicas = 4
    with Cluster(tmp_path, replicas, steps=14, topology="ring") as cluster:
        for r in range(replicas):
            die = {1: "5:between", 3: "6:round"}.get(r)
            cluster.start(r, *(["--die", die] if die else []))
        codes = cluster.wait()
        assert codes == [0, -signal.SIGKILL, 0, -signal.SIGKILL], cluster.logs()
        results = cluster.results()
    # after step 6 the round replica 1 confirmed is in; the next one (with replica 3) must be dropped by replica 0
    _check_survivors_mean(results, [0, 2], 6)
    assert results[0]["stats"].dropped == 1 and results[2]["stats"].dropped == 0
    assert [results[0]["records"][k]["n"] for k in (4, 5, 6)] == [4, 3, 2]  # records of steps 5, 6, 7


@drill
@pytest.mark.parametrize("replicas", [3, 4])
def test_a_kill_during_global_avg(tmp_path: Path, replicas: int) -> None:
    with Cluster(tmp_path, replicas, steps=12, topology="ring", eval_every=3, timeout=8) as cluster:
        for r in range(replicas):
            cluster.start(r, *(["--die", "6:global_avg"] if r == 1 else []))
        codes = cluster.wait()
        assert codes == [0, -signal.SIGKILL] + [0] * (replicas - 2), cluster.logs()
        results = cluster.results()
    survivors = [r for r in range(replicas) if r != 1]
    for r in survivors:
        evals = results[r]["evals"]
        assert [(e[0], e[1]) for e in evals] == [("ok", 3), ("failed", 6), ("ok", 9), ("ok", 12)], evals
        # a completed global_avg is the members' mean, computed here from their own records
        for e in evals[2:]:
            torch.testing.assert_close(e[2], torch.stack([_params_at(results[m], e[1]) for m in survivors]).mean(0),
                                       rtol=0, atol=0)
    # the failed global_avg put every survivor's values back (the worker checks it too); the round replica 1
    # launched before it died is dropped by its peer, so the mean to keep is the survivors' after step 6
    _check_survivors_mean(results, survivors, 6)


@drill
def test_a_lighthouse_restart_pauses_training_and_it_goes_on(tmp_path: Path) -> None:
    """What happens (torchft 0.2): the quorum a replica asked for when the lighthouse went down fails after the
    manager's quorum_timeout; the wrapper asks again and the new lighthouse forms a quorum of the replicas that
    ask. A replica that got into it a step ahead of the others is their source: they heal from it (a copy: the
    mean moves to its values). Nobody exits, and the replicas end together. The new lighthouse numbers its quorums
    from 1 again, so where its first quorum has every replica under the id they had, nothing is rebuilt (torchft
    reconfigures on a new id only), and where it forms one of the first to ask, the wrapper sees a change."""
    replicas, steps = 3, 30
    with Cluster(tmp_path, replicas, steps=steps, topology="ring", step_time=0.2, timeout=5) as cluster:
        for r in range(replicas):
            cluster.start(r)
        cluster.wait_for_step(0, 5)
        down = time.time()
        cluster.restart_lighthouse(down_s=2)
        assert cluster.wait() == [0] * replicas, cluster.logs()
        results = cluster.results()
    for r in range(replicas):
        records = results[r]["records"]
        assert records[-1]["step"] == steps and records[-1]["n"] == replicas
        gaps = [b["time"] - a["time"] for a, b in zip(records, records[1:])]
        pause = max(gaps)
        assert 2 < pause < 2 + 5 + 10, gaps  # down 2 s, a quorum timeout (5 s), then at once (slack: a busy CPU)
        assert sorted(gaps)[len(gaps) // 2] < 1.5  # otherwise steady: 0.2 s a step
        assert records[0]["time"] < down < records[-1]["time"]
    finals = torch.stack([results[r]["final"] for r in range(replicas)])
    assert torch.isfinite(finals).all()


@pytest.fixture(scope="module")
def lighthouse() -> Any:
    port = free_port()
    proc = _lighthouse(port)
    yield f"http://127.0.0.1:{port}"
    proc.kill()
    proc.wait()


def _manager(lighthouse: str, **kw: Any) -> Any:
    import torch.distributed as dist
    from torchft import Manager, ProcessGroupGloo

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    args: dict[str, Any] = {"pg": ProcessGroupGloo(), "min_replica_size": 1, "load_state_dict": None,
                            "state_dict": None, "use_async_quorum": False, "replica_id": "check",
                            "store_addr": "127.0.0.1", "store_port": store.port, "rank": 0, "world_size": 1,
                            "hostname": "127.0.0.1", "lighthouse_addr": lighthouse, **kw}
    manager = Manager(**args)
    manager._test_store = store  # kept alive with the manager
    return manager


@pytest.mark.parametrize(("manager_kw", "wrapper_kw", "message"), [
    ({"use_async_quorum": True}, {}, "made with use_async_quorum=True"),
    ({}, {"topology": "complete"},
     "Invalid topology='complete' with a manager: with 3 members it averages groups of 3"),
    ({}, {"compression": "lowrank"}, "Invalid compression=LowRank(rank=1) with a manager"),
    ({}, {"max_delay": 2}, "Invalid max_delay=2 with a manager"),
    ({}, {"gossip_every": 4}, "Invalid gossip_every=4 with a manager"),
    ({}, {"rank": 0}, "Invalid rank=0 with a manager"),
    ({}, {"world_size": 4}, "Invalid world_size=4 with a manager"),
])
def test_what_a_manager_does_not_take_is_a_clear_error(lighthouse: str, manager_kw: dict[str, Any],
                                                        wrapper_kw: dict[str, Any], message: str) -> None:
    from decent_optim_wrapper import LowRank

    manager = _manager(lighthouse, **manager_kw)
    try:
        model = torch.nn.Linear(4, 3)
        if wrapper_kw.get("compression") == "lowrank":
            wrapper_kw = {"compression": LowRank(rank=1)}
        with pytest.raises(ValueError, match=re.escape(message)):
            DecentOptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), manager=manager, **wrapper_kw)
        assert "decent_optim_wrapper" not in manager._user_state_dicts  # refused before it registered anything
    finally:
        manager.shutdown(wait=False)


def test_a_manager_that_is_not_one_and_the_operations_it_does_not_offer(lighthouse: str) -> None:
    model = torch.nn.Linear(4, 3)
    with pytest.raises(ValueError, match=re.escape("Invalid manager='nope'. Must be a torchft.Manager.")):
        DecentOptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), manager="nope")
    manager = _manager(lighthouse)
    try:
        opt = DecentOptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), manager=manager, topology="ring")
        assert type(opt).__name__ == "ManagedDecentOptimWrapper" and isinstance(opt, DecentOptimWrapper)
        assert "decent_optim_wrapper" in manager._user_state_dicts
        with pytest.raises(NotImplementedError, match="add_param_group"):
            opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
        with pytest.raises(NotImplementedError, match="reduce_metrics"):
            opt.reduce_metrics({"loss": 1.0})
        with pytest.raises(RuntimeError, match=re.escape("revert_global_avg() without a global_avg")):
            opt.revert_global_avg()
        # a checkpoint keeps the inner optimizer's state and the round counter; a bad one names the field
        sd = opt.state_dict()
        sd["decent_optim_wrapper"]["round"] = 7
        opt.load_state_dict(sd)
        assert opt.round == 7 and opt.state_dict()["decent_optim_wrapper"] == {"round": 7, "managed": True}
        sd["decent_optim_wrapper"]["round"] = -1
        with pytest.raises(ValueError, match=re.escape("Invalid state_dict['decent_optim_wrapper']")):
            opt.load_state_dict(sd)
    finally:
        manager.shutdown(wait=False)


def test_no_module_but_ft_imports_torchft_or_ft_at_import_time() -> None:
    """Importing the package never imports torchft: no module imports it, or ``.ft``, at module level (``wrapper``
    imports ``.ft`` inside ``DecentOptimWrapper.__new__``, only when a manager is given). The subprocess test
    below checks the same end to end (slow: it starts a Python with torch)."""
    import ast

    package = Path(__file__).resolve().parents[1] / "src" / "decent_optim_wrapper"
    for path in sorted(package.glob("*.py")):
        if path.name == "ft.py":
            continue
        for node in ast.parse(path.read_text()).body:  # module level only
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):  # `from .ft import X` and `from . import ft` alike
                base = "." * node.level + (node.module or "")
                names = [base] + [base + ("." if node.module else "") + a.name for a in node.names]
            else:
                continue
            assert not [n for n in names if n.split(".")[0] == "torchft" or n in (".ft", "decent_optim_wrapper.ft")], \
                f"{path.name} imports {names} at import time"


@pytest.mark.slow
def test_without_a_manager_torchft_is_not_imported() -> None:
    code = ("import sys, torch; from decent_optim_wrapper import DecentOptimWrapper; "
            "DecentOptimWrapper(torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)); "
            "assert 'torchft' not in sys.modules and 'decent_optim_wrapper.ft' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
