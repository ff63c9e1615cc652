"""The benchmark harness itself: a tiny configuration produces every artifact."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_kernel_benchmark_tiny_writes_every_artifact(tmp_path):
    proc = subprocess.run(
        [sys.executable, "bench/bench_kernels.py", "--preset", "tiny", "--runs", "3", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "kernels_tiny.json").read_text())
    backends = {r["backend"] for r in data["rows"]}
    assert {"reference (eager, T=20)", "torch closed form"} <= backends
    assert all(r["median_us"] > 0 and r["GB/s"] > 0 for r in data["rows"])
    assert data["machine"]["cores"] >= 1 and "torch_threads" in data["machine"]
    md = (tmp_path / "kernels_tiny.md").read_text()
    assert "| backend |" in md and "Machine:" in md and "Command:" in md
    for png in ("latency_vs_batch.png", "roofline_share.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
