"""Plain TCP on the emulated cluster, no torch: does the hosts' congestion control keep a link full when one
host sends a round's worth of bytes to alternating peers, as ``one-peer-exp`` does, and when two of those
bursts overlap, as with ``max_delay=2``?

    uv run python benchmarks/tcp_bursts.py --tcp-cc bbr cubic          # root; see cluster_compare --tcp-cc

Host 0 sends ``--mbytes`` to host 1, then host 2, and so on in turn. A new burst starts every ``--period`` ms
whether or not the one before it has finished, so with a period shorter than a burst's time on the link, two
bursts share host 0's link. Each receiver answers one byte per burst. It prints, per congestion control and
period, the median time of a burst and the time per burst over the whole run. If the link stays full, that
time is the burst's bytes at the measured rate, or the period if the period is longer.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cluster import Cluster, connect  # noqa: E402

PORT = 5555


def sink(addr: str, nbytes: int) -> None:
    """Accept one connection; read bursts of ``nbytes`` and answer each with one byte, until EOF."""
    srv = socket.create_server((addr, PORT))
    conn, _ = srv.accept()
    buf = bytearray(1 << 20)
    while True:
        got = 0
        while got < nbytes:
            n = conn.recv_into(buf, min(len(buf), nbytes - got))
            if n == 0:
                return
            got += n
        conn.sendall(b"k")


def source(peers: list[str], nbytes: int, period_s: float, bursts: int) -> None:
    conns = [connect(p, PORT) for p in peers]  # the sinks may still be starting
    data, times = b"x" * nbytes, []
    locks = [threading.Lock() for _ in conns]  # one burst at a time per connection, as gloo sends them

    def burst(i: int) -> None:
        with locks[i]:
            t = time.perf_counter()
            conns[i].sendall(data)
            conns[i].recv(1)
            times.append(time.perf_counter() - t)

    threads, t0 = [], time.perf_counter()
    for k in range(bursts):
        time.sleep(max(0.0, t0 + k * period_s - time.perf_counter()))
        threads.append(threading.Thread(target=burst, args=(k % len(conns),)))
        threads[-1].start()
    for t in threads:
        t.join()
    total = time.perf_counter() - t0
    print(f"{statistics.median(times[bursts // 6:]) * 1e3:.1f} {total / bursts * 1e3:.1f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tcp-cc", nargs="+", default=["bbr", "cubic"])
    p.add_argument("--rate", default="1gbit")
    p.add_argument("--mbytes", type=float, default=6.47, help="one burst (default: an MLP round in bf16)")
    p.add_argument("--periods", type=float, nargs="+", default=[30, 45, 60], help="ms between burst starts")
    p.add_argument("--peers", type=int, default=2, help="receivers host 0 takes turns with")
    p.add_argument("--bursts", type=int, default=60)
    p.add_argument("--role", choices=["sink", "source"], help=argparse.SUPPRESS)
    p.add_argument("--addrs", help=argparse.SUPPRESS)
    a = p.parse_args()
    nbytes = int(a.mbytes * 1e6)
    if a.role == "sink":
        return sink(a.addrs, nbytes)
    if a.role == "source":
        return source(a.addrs.split(","), nbytes, a.periods[0] / 1e3, a.bursts)
    me = [sys.executable, str(Path(__file__).resolve()), "--mbytes", str(a.mbytes), "--bursts", str(a.bursts)]
    print("tcp_cc  period ms  burst ms (median)  ms per burst (whole run)  link time of a burst ms")
    for cc in a.tcp_cc:
        with Cluster(hosts=a.peers + 1, rate=a.rate, tcp_cc=cc) as c:
            rate = c.measure_rate()
            for period in a.periods:
                sinks = [subprocess.Popen(h.argv([*me, "--role", "sink", "--addrs", h.addr])) for h in c.hosts[1:]]
                src = c.hosts[0].argv([*me, "--role", "source", "--periods", str(period),
                                       "--addrs", ",".join(h.addr for h in c.hosts[1:])])
                out = subprocess.run(src, capture_output=True, text=True, timeout=600)
                for s in sinks:
                    s.wait(timeout=30)
                if out.returncode != 0:
                    raise SystemExit(out.stderr)
                med, per = out.stdout.split()
                print(f"{cc:7} {period:9.0f} {med:>18} {per:>25} {nbytes * 8 / rate * 1e3:>24.1f}", flush=True)


if __name__ == "__main__":
    main()
