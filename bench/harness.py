"""Timing, machine description and report writing shared by the benchmarks.

CPU: wall-clock with time.perf_counter around each call, thread count recorded. GPU: CUDA events
through triton.testing.do_bench (and CUDA-graph replay for launch-bound sizes). Every table
states its machine; ratios are only ever taken between numbers measured in the same run.
"""
from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Timing:
    median_us: float
    p90_us: float
    runs: int


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"model name\s*:\s*(.+)", text)
        if m:
            return m.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict:
    info = {
        "device": device,
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:  # the machine is often shared: the load beside the numbers says how quiet it was
        info["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["sms"] = props.multi_processor_count
    return info


def machine_slug(info: dict) -> str:
    name = info.get("gpu") or f"cpu-{info['cores']}core-{info['cpu']}"
    return re.sub(r"[^a-zA-Z0-9]+", "-", name).strip("-").lower()[:60]


def _flush_cache(buf: Optional[torch.Tensor]) -> None:
    if buf is not None:
        buf.zero_()


def time_fn(fn: Callable[[], object], device: str, *, runs: int = 20, warmup: int = 3, cold: bool = False,
            min_time_s: float = 0.0) -> Timing:
    """Median and p90 of ``runs`` calls (at least ``min_time_s`` of calls). ``cold``: a buffer
    larger than the last-level cache is overwritten before each call, so inputs come from DRAM."""
    flush = torch.empty(64 * 1024 * 1024 // 4 if device == "cpu" else 256 * 1024 * 1024 // 4,
                        dtype=torch.float32, device=device) if cold else None
    if device == "cuda":
        return _time_cuda(fn, runs, warmup, flush)
    for _ in range(warmup):
        fn()
    samples: List[float] = []
    start_all = time.perf_counter()
    while len(samples) < runs or (time.perf_counter() - start_all) < min_time_s:
        _flush_cache(flush)
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
        if len(samples) >= 10 * runs:
            break
    return _summarize(samples)


def _time_cuda(fn, runs, warmup, flush) -> Timing:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(runs):
        _flush_cache(flush)
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        samples.append(s.elapsed_time(e) * 1e3)
    return _summarize(samples)


def time_cuda_graph(fn, runs: int = 100) -> Timing:
    """Per-call time of ``fn`` captured once in a CUDA graph and replayed (launch overhead only)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    reps = 20
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    samples = []
    st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    st.record()
    g.replay()
    en.record()
    torch.cuda.synchronize()
    # About 0.2 s of replays at most: slow ops (ms per call) would otherwise take seconds per row.
    runs = max(5, min(runs, int(0.2e3 / max(st.elapsed_time(en), 1e-3))))
    for _ in range(runs):
        st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        st.record()
        g.replay()
        en.record()
        torch.cuda.synchronize()
        samples.append(st.elapsed_time(en) * 1e3 / reps)
    return _summarize(samples)


def _summarize(samples: List[float]) -> Timing:
    samples = sorted(samples)
    p90 = samples[min(len(samples) - 1, int(0.9 * len(samples)))]
    return Timing(statistics.median(samples), p90, len(samples))


def copy_timing(nbytes_moved: int, device: str, **kw) -> Timing:
    """``dst.copy_(src)`` into a preallocated buffer moving the same number of bytes (half read,
    half written): the bandwidth a streaming kernel can hope for on this machine."""
    n = max(nbytes_moved // 8, 1)
    src = torch.randn(n, device=device)
    dst = torch.empty(n, device=device)
    return time_fn(lambda: dst.copy_(src), device, **kw)


@dataclass
class Report:
    title: str
    machine: dict
    command: str
    rows: List[dict] = field(default_factory=list)

    def write(self, name: str, columns: List[str], out_dir: Optional[Path] = None, plots: Optional[Callable] = None) -> Path:
        out_dir = Path(out_dir) if out_dir else RESULTS_DIR / machine_slug(self.machine)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{name}.json").write_text(json.dumps(asdict(self), indent=1))
        (out_dir / f"{name}.md").write_text(self.markdown(columns))
        if plots is not None:
            plots(self, out_dir)
        return out_dir

    def markdown(self, columns: List[str]) -> str:
        m = self.machine
        head = [f"## {self.title}", "",
                f"Machine: {m.get('gpu') or m['cpu']} ({m['cores']} cores, torch threads {m['torch_threads']}), "
                f"torch {m['torch']}, triton {m.get('triton', '-')}, Python {m['python']}"
                + (f"; load average (1, 5, 15 min) {m['load_avg']} at the start" if m.get("load_avg") else "")
                + (f", {m['load_avg_end']} at the end" if m.get("load_avg_end") else "") + ".", "",
                f"Command: `{self.command}`", "",
                "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for r in self.rows:
            head.append("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |")
        return "\n".join(head) + "\n"


def _fmt(v) -> str:
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    return str(v)


def git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return "unknown"
