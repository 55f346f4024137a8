"""Failure drill on the emulated cluster: SIGKILL one replica mid-training and measure what it costs.

    sudo uv run python benchmarks/ft_drill.py --modes gossip-ring --steps 300 --kill-at 100 --baseline

Builds the cluster of ``cluster.py`` (4 hosts, 1 Gbit/s by default) and trains the ``lm`` workload with the
settings of ``cluster_compare.py`` (batch 2 x 128 bytes per replica, AdamW lr 2e-3, warm-up 20, seed 0). For each
mode in ``--modes``, an undisturbed run (with ``--baseline``) and a run where, once host 0 has reached step
``--kill-at``, the training process of host ``--victim`` (not its torchrun) gets SIGKILL:

    gossip-<topology>   decent_optim_wrapper.ft over a torchft Manager: the lighthouse in host 0's namespace
                        (heartbeat timeout --heartbeat-ms), and on each host k its own
                        ``torchrun --nnodes 1 --nproc-per-node 1 --max-restarts 3 --master-addr 10.213.0.<k+1>``
                        (REPLICA_GROUP_ID=k): the killed replica is restarted by its torchrun, rejoins and heals
    torchft-ddp         torchft.ddp.DistributedDataParallel + torchft.optim.OptimizerWrapper, launched the same way
    ckpt-<topology>     plain DecentOptimWrapper over one 4-node torchrun job (c10d rendezvous at host 0,
                        --max-restarts 3), CheckpointManager every --save-every steps: every rank restarts and
                        resumes from the newest common checkpoint

Reports, per run: the survivors' steps/s before the kill, during (kill until the restarted replica takes its
first step as a member), after; the pause (kill until every survivor took a step in a quorum without the dead
replica; for ckpt: until the restarted job steps again); the time until the killed replica is back; the run's
wall-clock (launch to last step) and its excess over the undisturbed run; the validation loss of the mean of the
final replicas' parameters. Writes summary.json and the per-step logs under --out. Needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster import Cluster, ClusterError, Host, format_rate, kill_namespace_processes  # noqa: E402

WORKER = Path(__file__).resolve().parent / "ft_drill_worker.py"
LIGHTHOUSE_PORT = 29510
STORE_PORT = 29500


def lighthouse_exe() -> str:
    return str(Path(sys.executable).with_name("torchft_lighthouse"))


class Run:
    """One launch of a mode on the cluster, with an optional kill; its processes, its directory."""

    def __init__(self, cluster: Cluster, mode: str, args: argparse.Namespace, kill_at: int | None, out: Path) -> None:
        self.cluster, self.mode, self.args, self.kill_at, self.out = cluster, mode, args, kill_at, out
        self.kind, _, self.topology = mode.partition("-")
        if mode == "torchft-ddp":
            self.kind, self.topology = "torchft-ddp", ""
        self.procs: list[subprocess.Popen[bytes]] = []
        self.lighthouse: subprocess.Popen[bytes] | None = None
        self.t_launch = self.t_kill = 0.0

    def worker_args(self) -> list[str]:
        a = self.args
        mode = {"gossip": "gossip", "torchft-ddp": "torchft-ddp", "ckpt": "ckpt"}[self.kind]
        return ["--mode", mode, "--topology", self.topology or "ring", "--steps", str(a.steps), "--out",
                str(self.out.resolve()), "--timeout", str(a.timeout), "--save-every", str(a.save_every),
                "--replicas", str(len(self.cluster.hosts))]

    def env(self, h: Host) -> dict[str, str]:
        # ckpt: the README's alternative to init_distributed (see ft_drill_worker.run_ckpt for why it is needed)
        extra = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"} if self.kind == "ckpt" and self.args.fresh_store else {}
        return {**os.environ, **extra, "GLOO_SOCKET_IFNAME": h.ifname, "OMP_NUM_THREADS": "1", "DOW_HOST": str(h.index),
                "PYTHONUNBUFFERED": "1", "REPLICA_GROUP_ID": str(h.index),
                "TORCHFT_LIGHTHOUSE": f"http://{self.cluster.hosts[0].addr}:{LIGHTHOUSE_PORT}"}

    def start(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        logs = self.out / "logs"
        logs.mkdir(exist_ok=True)
        hosts = self.cluster.hosts
        self.t_launch = time.time()
        if self.kind != "ckpt":
            h0 = hosts[0]
            with open(logs / "lighthouse.log", "wb") as log:
                self.lighthouse = subprocess.Popen(h0.argv([
                    lighthouse_exe(), "--min_replicas", "1", "--join_timeout_ms", str(self.args.join_ms),
                    "--heartbeat_timeout_ms", str(self.args.heartbeat_ms), "--quorum_tick_ms", "100",
                    "--bind", f"{h0.addr}:{LIGHTHOUSE_PORT}"]), stdout=log, stderr=subprocess.STDOUT)
            time.sleep(1.0)
            for h in hosts:
                # One single-node job per replica: static rendezvous, the agent hosts the store at the host's own
                # address (MASTER_ADDR), which the Manager connects to and advertises to the other replicas.
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "1",
                       "--max-restarts", "3", "--monitor-interval", "0.1", "--master-addr", h.addr,
                       "--master-port", str(STORE_PORT), str(WORKER), *self.worker_args()]
                with open(logs / f"host{h.index}.log", "wb") as log:
                    self.procs.append(subprocess.Popen(h.argv(cmd), stdout=log, stderr=subprocess.STDOUT,
                                                       env=self.env(h)))
        else:
            rdzv = f"{hosts[0].addr}:{STORE_PORT + 1}"
            for h in hosts:
                # As cluster.Cluster.torchrun, but with restarts: when one worker dies its agent re-rendezvouses
                # and the other agents restart theirs (the whole job restarts, as torchrun does).
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(len(hosts)), "--node-rank",
                       str(h.index), "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv,
                       "--rdzv-id", f"{self.cluster.prefix}{self.out.name}", "--rdzv-conf",
                       f"is_host={int(h.index == 0)}", "--local-addr", h.addr, "--max-restarts", "3",
                       "--monitor-interval", "0.1", str(WORKER), *self.worker_args()]
                with open(logs / f"host{h.index}.log", "wb") as log:
                    self.procs.append(subprocess.Popen(h.argv(cmd), stdout=log, stderr=subprocess.STDOUT,
                                                       env=self.env(h)))

    def host_step(self, k: int) -> int:
        recs = read_jsonl(self.out / f"replica{k}.jsonl")
        return max((r["step"] for r in recs if "step" in r), default=0)

    def wait(self) -> None:
        deadline = time.monotonic() + self.args.run_timeout
        try:
            while any(p.poll() is None for p in self.procs):
                if self.kill_at is not None and not self.t_kill and self.host_step(0) >= self.kill_at:
                    pid = int((self.out / f"pid{self.args.victim}").read_text())
                    os.kill(pid, signal.SIGKILL)
                    self.t_kill = time.time()
                    print(f"  killed host {self.args.victim}'s worker (pid {pid}) at host 0's step "
                          f"{self.host_step(0)}", flush=True)
                bad = [p.returncode for p in self.procs if p.poll() not in (None, 0)]
                if bad:
                    raise ClusterError(f"a torchrun exited with {bad}; see {self.out}/logs")
                if time.monotonic() > deadline:
                    raise ClusterError(f"run did not finish within {self.args.run_timeout} s; see {self.out}/logs")
                time.sleep(0.05)
        finally:
            kill_namespace_processes([h.netns for h in self.cluster.hosts])  # the lighthouse, anything left
            for p in self.procs + ([self.lighthouse] if self.lighthouse else []):
                p.wait()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by SIGKILL
            pass
    return out


def rate(recs: list[dict[str, Any]], t0: float, t1: float) -> float | None:
    """Steps per second completed in (t0, t1]."""
    n = sum(1 for r in recs if t0 < r["t"] <= t1)
    return n / (t1 - t0) if t1 > t0 and n else None


_VAL: dict[str, Any] = {}


def val_loss(params: torch.Tensor) -> float:
    """The lm workload's validation loss at these (flat) parameters."""
    import workloads

    if "wl" not in _VAL:
        _VAL["wl"] = workloads.build("lm", 0, 4, 2, 2e-3, 0)
    wl = _VAL["wl"]
    torch.nn.utils.vector_to_parameters(params, wl.model.parameters())
    wl.model.eval()
    return wl.val_loss(wl.model)


def analyse(run: Run, hosts: int, steps: int, victim: int | None) -> dict[str, Any]:
    recs = {k: read_jsonl(run.out / f"replica{k}.jsonl") for k in range(hosts)}
    step_recs = {k: [r for r in v if "step" in r] for k, v in recs.items()}
    res: dict[str, Any] = {"mode": run.mode, "kill_at": run.kill_at}
    t_end = max(r["t"] for v in step_recs.values() for r in v)
    res["wall_s"] = t_end - run.t_launch
    first = min(r["t"] for v in step_recs.values() for r in v)
    res["train_s"] = t_end - first  # first step anywhere to last step anywhere
    survivors = [k for k in range(hosts) if k != victim] if victim is not None else list(range(hosts))
    ref = step_recs[survivors[0]]
    warm = next(r["t"] for r in ref if r["step"] >= max(1, steps // 10))
    res["quorum_sizes"] = {k: sorted({r["n"] for r in v}) for k, v in step_recs.items()}
    res["lives"] = {k: sorted({r["life"] for r in v}) for k, v in recs.items()}
    res["ft_stats"] = {k: [r["ft_stats"] for r in v if "ft_stats" in r] for k, v in recs.items()}
    if run.t_kill:
        tk = run.t_kill
        res["kill_step_host0"] = max(r["step"] for r in step_recs[0] if r["t"] <= tk)
        # A later process by its pid: under a multi-node job only the failed node's agent counts a restart
        # (TORCHELASTIC_RESTART_COUNT stays 0 on the others), so "life" does not tell a restarted worker.
        pid0 = {k: v[0]["pid"] for k, v in recs.items()}
        back = [r for r in step_recs[victim] if r["pid"] != pid0[victim]]
        events = [r for r in recs[victim] if r["pid"] != pid0[victim] and "event" in r]
        t_back = back[0]["t"] if back else None
        res["victim_restart"] = {e["event"]: e["t"] - tk for e in events if e["event"] in ("start", "ready")}
        if run.kind == "ckpt":
            # every rank restarts: the survivors step again when the new attempt takes its first step
            again = [min((r["t"] for r in step_recs[k] if r["t"] > tk and r["pid"] != pid0[k]),
                         default=float("nan")) for k in survivors]
            res["resumed_from"] = [r.get("resumed_from") for r in recs[survivors[0]] if r.get("event") == "ready"]
        else:
            # a survivor steps again once it has taken a step in a quorum without the dead replica
            again = [min((r["t"] for r in step_recs[k] if r["t"] > tk and r["n"] < hosts),
                         default=float("nan")) for k in survivors]
        res["pause_s"] = max(again) - tk
        res["pause_s_by_survivor"] = {k: t - tk for k, t in zip(survivors, again)}
        res["largest_gap_s"] = max(b["t"] - a["t"] for a, b in zip(ref, ref[1:]) if b["t"] > tk)
        res["back_s"] = None if t_back is None else t_back - tk
        res["back_at_step"] = back[0]["step"] if back else None
        res["steps_per_s"] = {"before": rate(ref, warm, tk),
                              "during": rate(ref, tk, t_back) if t_back else None,
                              "after": rate(ref, t_back, t_end) if t_back else None}
    else:
        res["steps_per_s"] = {"all": rate(ref, warm, t_end)}
    finals = [torch.load(f) for f in sorted(run.out.glob("final*.pt"))]
    done = [f["params"] for f in finals if f["step"] == steps]
    res["final_members"] = len(done)
    res["val_loss"] = val_loss(torch.stack(done).mean(0)) if done else None
    errors = []
    for log in sorted((run.out / "logs").glob("*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if re.search(r"Traceback|Error|error|WARN|hang", line):
                errors.append(f"{log.name}: {line[:300]}")
    res["log_errors"] = errors[:60]
    res["log_error_count"] = len(errors)
    return res


def fmt(x: Any, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'mode':<22}{'kill':>6}{'wall s':>8}{'st/s pre':>9}{'during':>8}{'after':>8}{'pause s':>8}"
            f"{'back s':>8}{'lost s':>8}{'val loss':>10}{'vs base':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        sp = r["steps_per_s"]
        lines.append(f"{r['mode']:<22}{fmt(r['kill_at'], 'd'):>6}{r['wall_s']:>8.1f}"
                     f"{fmt(sp.get('before', sp.get('all'))):>9}{fmt(sp.get('during')):>8}{fmt(sp.get('after')):>8}"
                     f"{fmt(r.get('pause_s')):>8}{fmt(r.get('back_s')):>8}{fmt(r.get('lost_s'), '.1f'):>8}"
                     f"{fmt(r['val_loss'], '.4f'):>10}{fmt(r.get('val_vs_base'), '+.2%'):>9}")
    return "\n".join(lines)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hosts", type=int, default=4)
    p.add_argument("--rate", default="1gbit")
    p.add_argument("--modes", nargs="+", default=["gossip-ring"],
                   help="gossip-<topology>, torchft-ddp, ckpt-<topology>")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--kill-at", type=int, help="host 0's step at which the victim's worker gets SIGKILL")
    p.add_argument("--victim", type=int, default=2)
    p.add_argument("--baseline", action="store_true", help="also run each mode undisturbed (first)")
    p.add_argument("--heartbeat-ms", type=int, default=2000)
    p.add_argument("--join-ms", type=int, default=2000)
    p.add_argument("--save-every", type=int, default=25, help="ckpt modes: checkpoint period")
    p.add_argument("--init-distributed", dest="fresh_store", action="store_false",
                   help="ckpt modes: launch.init_distributed on torchrun's shared store (fails across nodes, see "
                   "the worker) instead of TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 + init_process_group")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds a worker's collective/quorum may wait")
    p.add_argument("--run-timeout", type=float, default=900.0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/cluster/ft-drill"))
    a = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    rows: list[dict[str, Any]] = []
    a.out.mkdir(parents=True, exist_ok=True)
    cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
    cfg["workload"] = "lm, batch 2 x 128 per replica, AdamW lr 2e-3 (betas 0.9/0.95, wd 0.1), warm-up 20, seed 0"
    with Cluster(a.hosts, a.rate) as cluster:
        cfg["measured_rate"] = cluster.measure_rate()
        print(f"{a.hosts} hosts, {format_rate(cluster.rate)} links ({format_rate(cfg['measured_rate'])} measured)",
              flush=True)
        for mode in a.modes:
            base = None
            for kill_at in ([None] if a.baseline else []) + ([a.kill_at] if a.kill_at is not None else []):
                name = f"{mode}-{'base' if kill_at is None else f'kill{kill_at}'}"
                run_dir = a.out / name
                if run_dir.exists():
                    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
                print(f"{name}: starting", flush=True)
                run = Run(cluster, mode, a, kill_at, run_dir)
                run.start()
                run.wait()
                res = analyse(run, a.hosts, a.steps, a.victim if kill_at is not None else None)
                if kill_at is None:
                    base = res
                elif base is not None:
                    res["lost_s"] = res["wall_s"] - base["wall_s"]
                    if res["val_loss"] is not None and base["val_loss"] is not None:
                        res["val_vs_base"] = res["val_loss"] / base["val_loss"] - 1
                rows.append(res)
                (a.out / "summary.json").write_text(json.dumps({"config": cfg, "runs": rows}, indent=2))
                print(table([res]).splitlines()[-1], flush=True)
    print(table(rows))
    print(f"\n{a.hosts} emulated hosts share this machine's {os.cpu_count()} cores: steps/s and seconds are of this "
          "machine, not of 4 real hosts. st/s: host 0's (a survivor's) steps per second after the first 10% of steps, "
          "before the kill / kill to the victim's first step back as a member / after. pause: kill until every "
          "survivor stepped without the victim (ckpt: until the restarted job stepped). back: kill until the "
          "victim's first step as a member. lost: wall-clock over the undisturbed run. Written to "
          f"{a.out}/summary.json")
    return rows


if __name__ == "__main__":
    main()
