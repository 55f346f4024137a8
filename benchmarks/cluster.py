"""An emulated multi-host cluster on one machine: network namespaces joined by a bridge, links shaped with tbf.

    sudo uv run python benchmarks/cluster.py --hosts 4 --rate 1gbit     # build it, measure the links, remove it

As a module (what ``cluster_compare.py`` does)::

    with Cluster(hosts=4, rate="1gbit") as cluster:
        print(cluster.measure_rate())                       # bit/s achieved between host 0 and host 1
        procs = cluster.torchrun("worker.py", ["--steps", "10"], procs_per_host=1, log_dir=Path("logs"))
        cluster.wait(procs, timeout=600)

Layout: host ``k`` is the network namespace ``dow-<pid>-h<k>`` with one interface ``eth0`` at
``10.213.0.<k+1>/24``; its veth peer ``h<k>`` sits in ``dow-<pid>-br``, attached to the bridge ``br0``. The
bridge namespace has no address and no other interface, and no namespace has a default route, so nothing
leaves these namespaces. Every host link is shaped in both directions: egress of ``eth0`` (host to switch)
and egress of ``h<k>`` (switch to host), each a tbf at the given rate, so a host can send and receive at the
rate at once, like a full-duplex port of a switch. Traffic between two ranks of one host goes from the host's
address to itself, which Linux routes over ``lo`` (local routing table), not through ``eth0``: intra-node
traffic is free, inter-node traffic pays the link, as on a real cluster.

Latency: ``netem`` (delay) is not built into every kernel (it is missing on the machine this was written on);
``delay=`` adds it as a child of each tbf where netem exists and raises a clear error where it does not.

Teardown: on normal exit, on exceptions and on Ctrl-C, ``Cluster.__exit__`` kills every process inside the
namespaces and deletes them (with their veths and the bridge). To survive SIGKILL of the harness too, a
cleaner process is started first, in its own session, reading a pipe whose write end only the harness holds:
when the harness dies for any reason the pipe closes and the cleaner does the same teardown.

Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN, for ``ip netns``); without it :class:`NeedRootError` says what is
missing and what to run instead.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

__all__ = ["Cluster", "ClusterError", "Host", "NeedRootError", "allowed_tcp_cc", "available_tcp_cc",
           "can_create_namespaces", "cleanup", "cleanup_stale", "connect", "format_rate", "namespace_pids",
           "namespaces", "parse_rate", "require_privileges"]

PREFIX = "dow-"
SUBNET = "10.213.0"  # host k is SUBNET.(k+1); the addresses exist only inside this harness's namespaces
IFNAME = "eth0"
# tbf queue: packets that wait longer than this are dropped (a switch port's buffer); tens of milliseconds
# keeps TCP at full rate without adding much delay under contention.
TBF_LATENCY_MS = 20
MIN_BURST = 64 * 1024  # >= one GSO super-packet (64 KiB), so tbf never has to split or drop one


class ClusterError(RuntimeError):
    """Building, using or removing the emulated cluster failed."""


class NeedRootError(ClusterError):
    """The process lacks the privileges that network namespaces need."""


def parse_rate(rate: str | float) -> int:
    """``"1gbit"``, ``"100mbit"``, ``"500kbit"``, ``"1e9"`` (bit/s) -> bit/s."""
    if isinstance(rate, (int, float)):
        value = float(rate)
    else:
        m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kmg]?)(?:bit|bps|b)?\s*", rate.lower())
        if m is None:
            raise ValueError(f"Invalid rate={rate!r}. Must be like '1gbit', '100mbit', '500kbit' or bit/s.")
        value = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]
    if not value > 0:
        raise ValueError(f"Invalid rate={rate!r}. Must be > 0.")
    return int(value)


def format_rate(bits_per_s: float) -> str:
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits_per_s >= scale:
            return f"{bits_per_s / scale:.3g} {unit}"
    return f"{bits_per_s:.3g} bit/s"


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise ClusterError(f"the `{argv[0]}` command is missing: install iproute2 (apt-get install iproute2)") from None
    if check and proc.returncode != 0:
        err = proc.stderr.strip()
        if "Operation not permitted" in err or "Permission denied" in err:
            raise NeedRootError(_need_root_message(f"`{' '.join(argv)}` said: {err}"))
        raise ClusterError(f"`{' '.join(argv)}` failed: {err}")
    return proc


def available_tcp_cc() -> set[str]:
    """The TCP congestion controls this kernel offers (a namespace may pick any of them)."""
    return set(Path("/proc/sys/net/ipv4/tcp_available_congestion_control").read_text().split())


def allowed_tcp_cc() -> set[str]:
    """The congestion controls a network namespace other than the machine's own may choose as its default."""
    return set(Path("/proc/sys/net/ipv4/tcp_allowed_congestion_control").read_text().split())


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run("ip", *args, check=check)


def _need_root_message(detail: str) -> str:
    argv = " ".join(shlex.quote(a) for a in sys.argv) if sys.argv and sys.argv[0] else "benchmarks/cluster_compare.py"
    return (
        "The emulated cluster needs root: creating network namespaces, veths and tc qdiscs needs CAP_NET_ADMIN "
        f"and CAP_SYS_ADMIN, which this process (uid {os.geteuid()}) does not have ({detail}); a container must "
        "grant them too.\n"
        f"Run it as root instead, e.g.:  sudo env PATH=\"$PATH\" uv run python {argv}\n"
        "Without root, benchmarks/train_compare.py runs the same comparison over loopback (no link shaping)."
    )


def namespaces() -> list[str]:
    """Names of all network namespaces (``ip netns list``)."""
    return [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()]


def namespace_pids(ns: str) -> list[int]:
    """Processes inside network namespace ``ns``."""
    proc = _ip("netns", "pids", ns, check=False)
    return [int(p) for p in proc.stdout.split()] if proc.returncode == 0 else []


def kill_namespace_processes(names: Sequence[str], timeout: float = 10.0) -> None:
    """SIGKILL every process inside these namespaces, until none is left."""
    deadline = time.monotonic() + timeout
    while True:
        pids = [pid for ns in names for pid in namespace_pids(ns)]
        if not pids:
            return
        if time.monotonic() > deadline:
            raise ClusterError(f"processes {pids} in namespaces {list(names)} survived SIGKILL for {timeout} s")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def cleanup(prefix: str) -> list[str]:
    """Kill the processes in, and delete, every namespace whose name starts with ``prefix``; return the names."""
    names = [ns for ns in namespaces() if ns.startswith(prefix)]
    kill_namespace_processes(names)
    for ns in names:
        _ip("netns", "del", ns, check=False)  # deleting a namespace deletes its veths and bridge
    left = [ns for ns in namespaces() if ns.startswith(prefix)]
    if left:
        raise ClusterError(f"could not delete namespaces {left}")
    return names


def cleanup_stale() -> list[str]:
    """Remove the namespaces of harnesses that no longer run (``dow-<pid>-*`` whose pid is gone)."""
    removed = []
    for ns in namespaces():
        m = re.fullmatch(re.escape(PREFIX) + r"(\d+)-.*", ns)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            removed += cleanup(f"{PREFIX}{m.group(1)}-")
    return removed


def require_privileges() -> None:
    """Raise :class:`NeedRootError` (or :class:`ClusterError`) unless this process can create namespaces."""
    if os.geteuid() != 0:
        raise NeedRootError(_need_root_message("not root"))
    probe = f"{PREFIX}{os.getpid()}-probe"
    _ip("netns", "add", probe)
    _ip("netns", "del", probe)


def can_create_namespaces() -> tuple[bool, str]:
    """Whether this process can build a cluster; when not, the reason."""
    try:
        require_privileges()
    except NeedRootError as exc:
        return False, str(exc).splitlines()[0]
    except ClusterError as exc:
        return False, str(exc)
    return True, ""


@dataclass(frozen=True)
class Host:
    """One emulated machine: a network namespace with one shaped interface."""

    index: int
    netns: str
    addr: str
    ifname: str = IFNAME

    def argv(self, cmd: Sequence[str]) -> list[str]:
        """``cmd`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.netns, *cmd]

    def counters(self, ifname: str | None = None) -> dict[str, int]:
        """Bytes and packets an interface of this host has sent and received so far."""
        out = _ip("-n", self.netns, "-s", "-j", "link", "show", "dev", ifname or self.ifname).stdout
        stats = json.loads(out)[0]["stats64"]
        return {"tx_bytes": stats["tx"]["bytes"], "rx_bytes": stats["rx"]["bytes"],
                "tx_packets": stats["tx"]["packets"], "rx_packets": stats["rx"]["packets"]}


class Cluster:
    """``hosts`` network namespaces on one bridge, every host link shaped to ``rate`` in both directions.

    Use as a context manager; everything it created is removed on exit, on Ctrl-C, on an exception, and (by
    its cleaner process) when the harness is killed.
    """

    def __init__(self, hosts: int, rate: str | float, delay_ms: float = 0.0, name: str | None = None,
                 queue_ms: float = TBF_LATENCY_MS, tcp_cc: str | None = None) -> None:
        if hosts < 2:
            raise ValueError(f"Invalid hosts={hosts}. Must be >= 2.")
        if hosts > 250:
            raise ValueError(f"Invalid hosts={hosts}. Must be <= 250 (one /24).")
        if delay_ms < 0:
            raise ValueError(f"Invalid delay_ms={delay_ms}. Must be >= 0.")
        if not queue_ms > 0:
            raise ValueError(f"Invalid queue_ms={queue_ms}. Must be > 0.")
        self.rate = parse_rate(rate)
        self.delay_ms = delay_ms
        self.queue_ms = queue_ms  # tbf's latency: the longest a packet may wait in a link's queue
        if tcp_cc is not None:
            available, allowed = available_tcp_cc(), allowed_tcp_cc()
            if tcp_cc not in available:
                raise ValueError(f"Invalid tcp_cc={tcp_cc!r}. This kernel has {sorted(available)}.")
            if tcp_cc not in allowed:
                # Outside the machine's own namespace the kernel lets a namespace pick only an allowed one (EPERM
                # otherwise, even for root); allowing one is the machine's business, not this harness's.
                raise ClusterError(
                    f"tcp_cc={tcp_cc!r} is not allowed in a network namespace on this machine (allowed: "
                    f"{' '.join(sorted(allowed))}). Allow it first, e.g.: sysctl -w "
                    f"net.ipv4.tcp_allowed_congestion_control=\"{' '.join(sorted(allowed | {tcp_cc}))}\"")
        # A new namespace starts with the machine's default congestion control (bbr on some machines, cubic on
        # most Linux installs); None keeps it, and tcp_cc() says which one the hosts ran.
        self._tcp_cc = tcp_cc
        self.prefix = f"{PREFIX}{os.getpid()}-" if name is None else f"{PREFIX}{os.getpid()}-{name}-"
        self.bridge_ns = self.prefix + "br"
        self.hosts = [Host(k, f"{self.prefix}h{k}", f"{SUBNET}.{k + 1}") for k in range(hosts)]
        self._cleaner: subprocess.Popen[bytes] | None = None
        self._cleaner_pipe: int | None = None
        self._launches = 0

    def tcp_cc(self) -> str:
        """The TCP congestion control the hosts run (read from the first host once the cluster is built)."""
        return _run(*self.hosts[0].argv(["sysctl", "-n", "net.ipv4.tcp_congestion_control"])).stdout.strip()

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Cluster:
        require_privileges()
        stale = cleanup_stale()
        if stale:  # only possible if a harness and its cleaner were both killed, e.g. a whole cgroup at once
            print(f"removed namespaces left by earlier runs: {stale}", file=sys.stderr)
        self._start_cleaner()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _start_cleaner(self) -> None:
        # The read end goes to the cleaner's stdin; the write end is non-inheritable (PEP 446), so only this
        # process holds it, and the cleaner sees EOF exactly when this process exits, however it exits.
        read_fd, write_fd = os.pipe()
        self._cleaner = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--cleaner", self.prefix],
                                         stdin=read_fd, start_new_session=True)
        os.close(read_fd)
        self._cleaner_pipe = write_fd

    def close(self) -> None:
        """Kill every process in the namespaces and delete them; idempotent."""
        try:
            cleanup(self.prefix)
        finally:
            if self._cleaner_pipe is not None:
                os.close(self._cleaner_pipe)  # the cleaner wakes up, finds nothing left and exits
                self._cleaner_pipe = None
            if self._cleaner is not None:
                self._cleaner.wait(timeout=30)
                self._cleaner = None

    def _build(self) -> None:
        br = self.bridge_ns
        _ip("netns", "add", br)
        _ip("-n", br, "link", "add", "br0", "type", "bridge")
        _ip("-n", br, "link", "set", "br0", "up")
        _ip("-n", br, "link", "set", "lo", "up")
        for h in self.hosts:
            _ip("netns", "add", h.netns)
            peer = f"h{h.index}"
            # Created directly inside the namespaces: no interface ever appears in the machine's own namespace.
            _ip("-n", h.netns, "link", "add", h.ifname, "type", "veth", "peer", "name", peer, "netns", br)
            _ip("-n", br, "link", "set", peer, "master", "br0")
            _ip("-n", br, "link", "set", peer, "up")
            _ip("-n", h.netns, "addr", "add", f"{h.addr}/24", "dev", h.ifname)
            _ip("-n", h.netns, "link", "set", h.ifname, "up")
            _ip("-n", h.netns, "link", "set", "lo", "up")
            self._shape(h.netns, h.ifname)
            self._shape(br, peer)
        for ns in [br] + [h.netns for h in self.hosts]:
            # No IPv6: no router solicitations or DAD packets on the links, so the byte counters see only the job.
            subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"],
                           capture_output=True)
        if self._tcp_cc is not None:
            for h in self.hosts:
                _run(*h.argv(["sysctl", "-qw", f"net.ipv4.tcp_congestion_control={self._tcp_cc}"]))
        self._wait_links_up()

    def _shape(self, ns: str, dev: str) -> None:
        rate_bytes = self.rate / 8
        burst = max(MIN_BURST, int(rate_bytes * 1e-3))  # 1 ms worth at the rate, at least one GSO packet
        _ip("-n", ns, "link", "set", dev, "txqueuelen", "1000")
        _run("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", "tbf", "rate", str(self.rate),
             "burst", str(burst), "latency", f"{self.queue_ms:g}ms")
        if self.delay_ms > 0:
            proc = subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:",
                                   "netem", "delay", f"{self.delay_ms}ms"], capture_output=True, text=True)
            if proc.returncode != 0:
                raise ClusterError(
                    f"cannot add {self.delay_ms} ms of latency: netem is not available in this kernel "
                    f"(tc said: {proc.stderr.strip()}); run without a delay (rate shaping only)"
                )

    def _wait_links_up(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        for h in self.hosts:
            while "LOWER_UP" not in _ip("-n", h.netns, "link", "show", h.ifname).stdout:
                if time.monotonic() > deadline:
                    raise ClusterError(f"link {h.ifname} of {h.netns} did not come up within {timeout} s")
                time.sleep(0.05)

    # ------------------------------------------------------------------ use
    def measure_rate(self, src: int = 0, dst: int = 1, seconds: float = 1.5) -> float:
        """Bit/s of one TCP stream from host ``src`` to host ``dst``, measured at the receiver."""
        s, d = self.hosts[src], self.hosts[dst]
        port = 5201
        me = str(Path(__file__).resolve())
        sink = subprocess.Popen(d.argv([sys.executable, me, "--sink", d.addr, str(port)]), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            source = subprocess.run(s.argv([sys.executable, me, "--source", d.addr, str(port), str(seconds)]),
                                    capture_output=True, text=True, timeout=seconds + 30)
            out, err = sink.communicate(timeout=30)
        finally:
            if sink.poll() is None:
                sink.kill()
        if source.returncode != 0 or sink.returncode != 0:
            raise ClusterError(f"link measurement failed: {source.stderr.strip()} {err.strip()}")
        return float(out)

    def torchrun(self, script: str | Path, args: Sequence[str], procs_per_host: int, log_dir: Path,
                 env: dict[str, str] | None = None) -> list[subprocess.Popen[bytes]]:
        """Start one ``torchrun`` per host, as a multi-node job does, with c10d rendezvous at host 0.

        Each worker gets ``GLOO_SOCKET_IFNAME=eth0`` (gloo over the shaped interface), ``OMP_NUM_THREADS=1``
        and ``DOW_HOST=<k>``; a host's output goes to ``log_dir/host<k>.log``.
        """
        if procs_per_host < 1:
            raise ValueError(f"Invalid procs_per_host={procs_per_host}. Must be >= 1.")
        self._launches += 1
        port = 29400 + self._launches  # a fresh store per launch: nothing to wait for from the previous one
        log_dir.mkdir(parents=True, exist_ok=True)
        procs = []
        for h in self.hosts:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(len(self.hosts)),
                   "--node-rank", str(h.index), "--nproc-per-node", str(procs_per_host),
                   "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{self.hosts[0].addr}:{port}",
                   "--rdzv-id", f"{self.prefix}{self._launches}",
                   # The namespace's address is in no hostname lookup, so say which agent hosts the store.
                   "--rdzv-conf", f"is_host={int(h.index == 0)}", "--local-addr", h.addr,
                   "--max-restarts", "0", str(script), *args]
            full_env = {**os.environ, **(env or {}), "GLOO_SOCKET_IFNAME": h.ifname, "OMP_NUM_THREADS": "1",
                        "DOW_HOST": str(h.index), "PYTHONUNBUFFERED": "1",
                        "LOGLEVEL": "INFO"}
            with open(log_dir / f"host{h.index}.log", "wb") as log:
                procs.append(subprocess.Popen(h.argv(cmd), stdout=log, stderr=subprocess.STDOUT, env=full_env))
        return procs

    def wait(self, procs: list[subprocess.Popen[bytes]], timeout: float, log_dir: Path | None = None,
             poll: Callable[[], None] | None = None) -> None:
        """Wait for every launch to exit 0; on a failure or the timeout, kill them all and raise with the logs."""
        deadline = time.monotonic() + timeout
        try:
            while any(p.poll() is None for p in procs):
                failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
                if failed:
                    raise ClusterError(f"host(s) {failed} exited with {[procs[i].returncode for i in failed]}"
                                       + _log_tails(log_dir))
                if time.monotonic() > deadline:
                    raise ClusterError(f"the job did not finish within {timeout:.0f} s" + _log_tails(log_dir))
                if poll is not None:
                    poll()
                time.sleep(0.2)
            failed = [i for i, p in enumerate(procs) if p.returncode != 0]
            if failed:
                raise ClusterError(f"host(s) {failed} exited with {[procs[i].returncode for i in failed]}"
                                   + _log_tails(log_dir))
        except BaseException:
            kill_namespace_processes([h.netns for h in self.hosts])
            for p in procs:
                p.wait()
            raise


def _log_tails(log_dir: Path | None, lines: int = 25) -> str:
    if log_dir is None:
        return ""
    parts = []
    for log in sorted(log_dir.glob("host*.log")):
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        parts.append(f"\n--- {log} (last {len(tail)} lines) ---\n" + "\n".join(tail))
    return "".join(parts)


# ---------------------------------------------------------------------- helper processes
def _sink(addr: str, port: int) -> None:
    """Accept one connection, read to EOF, print the rate in bit/s (first to last byte received)."""
    srv = socket.create_server((addr, port))
    conn, _ = srv.accept()
    total, first, last = 0, None, 0.0
    while data := conn.recv(1 << 20):
        now = time.perf_counter()
        if first is None:
            first = now
        else:
            total += len(data)  # the first chunk marks the start; counting it too would overstate the rate
        last = now
    print(total * 8 / (last - first) if first is not None and last > first else 0.0)


def connect(addr: str, port: int, wait_s: float = 10.0) -> socket.socket:
    """A TCP connection to ``addr:port``, retried for up to ``wait_s`` while the listener may still be starting."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return socket.create_connection((addr, port), timeout=10)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _source(addr: str, port: int, seconds: float) -> None:
    conn = connect(addr, port)
    chunk = b"\0" * (1 << 20)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        conn.sendall(chunk)
    conn.close()


def _cleaner(prefix: str) -> None:
    """Wait until the harness is gone (EOF on stdin), then remove whatever of its cluster is left."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the harness's to handle; this one waits for EOF
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    while sys.stdin.buffer.read(1 << 16):
        pass
    cleanup(prefix)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build an emulated cluster, measure its links, remove it.")
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--rate", default="1gbit", help="per host link, each direction (e.g. 1gbit, 100mbit)")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay per tbf (needs netem)")
    parser.add_argument("--cleanup-stale", action="store_true",
                        help="only remove namespaces left by harnesses that no longer run")
    parser.add_argument("--cleaner", metavar="PREFIX", help=argparse.SUPPRESS)
    parser.add_argument("--sink", nargs=2, metavar=("ADDR", "PORT"), help=argparse.SUPPRESS)
    parser.add_argument("--source", nargs=3, metavar=("ADDR", "PORT", "SECONDS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cleaner:
        _cleaner(args.cleaner)
    elif args.sink:
        _sink(args.sink[0], int(args.sink[1]))
    elif args.source:
        _source(args.source[0], int(args.source[1]), float(args.source[2]))
    elif args.cleanup_stale:
        print(f"removed: {cleanup_stale() or 'nothing'}")
    else:
        try:
            with Cluster(args.hosts, args.rate, args.delay_ms) as cluster:
                measured = cluster.measure_rate()
                print(f"{args.hosts} hosts, link {format_rate(cluster.rate)} requested, "
                      f"{format_rate(measured)} measured (one TCP stream, host 0 -> host 1)")
        except NeedRootError as exc:
            print(exc, file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
