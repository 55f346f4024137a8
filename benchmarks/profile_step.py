"""Profile ``DecentOptimWrapper.step()`` on a GPU: what it adds to the inner optimizer, and that it never makes
the host wait for the device.

    python benchmarks/profile_step.py --out results/profile      # needs a CUDA device

Two settings, each profiled with ``torch.profiler`` (CPU and CUDA activity) over a few steps and run again
under ``torch.cuda.set_sync_debug_mode("warn")``:

* ``nccl-1``: one rank in an NCCL process group (world size 1), a 100M-parameter transformer stack in bfloat16,
  fused AdamW, with and without ``torch.amp.GradScaler`` (fp32 parameters under float16 autocast);
* ``gloo-cuda-2``: two gloo ranks sharing the GPU (CUDA tensors), so that rounds are launched and applied on
  CUDA tensors (pairs through gloo's all-reduce: gloo has no point-to-point for CUDA tensors).

It counts the host-synchronising CUDA runtime calls (stream/device/event synchronise, blocking copies) made
by the thread that called ``step()`` (gloo's own worker threads stage CUDA tensors through host memory; they
are counted apart), writes ``summary.json``, the profiler's table per setting and a Chrome trace of the
``nccl-1`` run to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import threading
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from decent_optim_wrapper import DecentOptimWrapper
from decent_optim_wrapper.launch import run_local

SYNC_APIS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
             "cudaStreamWaitEvent_blocking")


def _is_sync(name: str) -> bool:
    # cudaMemcpyAsync does not block the host; plain cudaMemcpy does
    return name.startswith(SYNC_APIS) and not name.startswith("cudaMemcpyAsync")


def _model(d: int, layers: int, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.device("cuda"):
        stack = [torch.nn.TransformerEncoderLayer(d, max(1, d // 64), 4 * d, batch_first=True) for _ in range(layers)]
        return torch.nn.Sequential(*stack).to(dtype)


def _run(rank: int, world_size: int, setting: str, amp: bool, out_dir: str) -> dict[str, Any]:
    small = setting.startswith("gloo")
    dtype = torch.float32 if (amp or small) else torch.bfloat16
    model = _model(*((64, 2) if small else (768, 14)), dtype)
    opt = DecentOptimWrapper(torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True), topology="ring",
                             timeout=120)
    scaler = torch.amp.GradScaler("cuda") if amp else None
    x = torch.randn(8, 64, 64 if small else 768, device="cuda", dtype=dtype)

    def iteration() -> None:
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            loss = model(x).float().square().mean()
        if scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()

    def step() -> None:
        if scaler is not None:
            scaler.step(opt)
            scaler.update()  # not part of step(): GradScaler reads its inf flag on the host here
        else:
            opt.step()

    for _ in range(3):
        iteration()
        step()
    main_thread = threading.get_native_id()
    steps = 5
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            iteration()
            torch.cuda.synchronize()
            with torch.profiler.record_function("DecentOptimWrapper.step"):
                opt.step() if scaler is None else scaler.step(opt)
            if scaler is not None:
                with torch.profiler.record_function("GradScaler.update"):
                    scaler.update()
    torch.cuda.synchronize()
    windows = [(e.time_range.start, e.time_range.end) for e in prof.events() if e.name == "DecentOptimWrapper.step"]
    in_step: dict[str, int] = {}
    elsewhere: dict[str, int] = {}
    for e in prof.events():
        if not _is_sync(e.name):
            continue
        inside = any(a <= e.time_range.start <= b for a, b in windows)
        target = in_step if inside and e.thread in (main_thread, 0) else elsewhere
        key = e.name if inside else f"{e.name} (outside step)"
        target[key] = target.get(key, 0) + 1
    # the same steps under torch's sync debug mode: any synchronising call in this thread warns
    debug = []
    for _ in range(steps):
        iteration()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step() if scaler is None else scaler.step(opt)
        torch.cuda.set_sync_debug_mode("default")
        if scaler is not None:
            scaler.update()
        debug += [str(w.message)[:200] for w in caught if "synchroniz" in str(w.message)]
    name = f"{setting}{'-amp' if amp else ''}"
    if rank == 0:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        (Path(out_dir) / f"{name}.txt").write_text(table)
        if setting == "nccl-1" and not amp:
            prof.export_chrome_trace(str(Path(out_dir) / f"{name}.trace.json"))
    step_events = [e for e in prof.key_averages() if e.key == "DecentOptimWrapper.step"]
    return {"setting": name, "host_syncs_in_step": in_step, "other_syncs": elsewhere,
            "sync_debug_warnings": debug, "step_cpu_ms": step_events[0].cpu_time_total / steps / 1e3,
            "params": sum(p.numel() for p in model.parameters())}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/profile"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    rows = []
    for setting, ranks, backend, amp in (("nccl-1", 1, "nccl", False), ("nccl-1", 1, "nccl", True),
                                         ("gloo-cuda-2", 2, "gloo", False)):
        res = run_local(_run, ranks, setting, amp, str(args.out), backend=backend, timeout=900)
        rows += res
        for r in res[:1]:
            print(f"{r['setting']:<16} host syncs in step(): {r['host_syncs_in_step'] or 'none'}; "
                  f"sync-debug warnings: {len(r['sync_debug_warnings'])}; step CPU time {r['step_cpu_ms']:.3f} ms; "
                  f"elsewhere: {r['other_syncs']}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
