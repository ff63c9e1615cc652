"""Start-up benchmark: cold start (empty model cache: the GGUF files are de-quantized) against warm
start (the cache entries are loaded), side by side in one run.

    python bench/bench_startup.py                         # smollm2, the Gemma pair (2 ways), costeer serve
    python bench/bench_startup.py --cases smollm2 --warm-runs 3

Each case is a subprocess started as a user starts it; "ready" is the wall time from starting it
to the line that says it is ready: ``costeer generate --max-new-tokens 1``'s "ready in" line, or
``costeer serve``'s "listening on" line (the server is then stopped). The Gemma pair (Gemma 3 270M
as the LLM, SmolLM2 as the small model: two tokenizers) is timed twice: "gemma-pair" is a process
that loads both with ``load_model`` and prints "pair ready"; "gemma-cli" is
``costeer generate --llm gemma3-270m``, which also maps one vocabulary onto the other before its
"ready in" line. Python, torch and transformers
imports are included: that is what a user waits for. A cold run gets a fresh empty cache folder
(``$COSTEER_MODEL_CACHE``); the warm runs reuse it. Also measured: the GGUF
file's sha256 computed against remembered (per path, size, mtime) on a warm start.

Targets (issue 21): warm <= 0.15 x cold, and warm <= 6 s for SmolLM2 on a 2-core machine.
Writes JSON under bench/results/<machine>/startup.json (or --out) and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.harness import RESULTS_DIR, git_rev, machine_info, machine_slug  # noqa: E402

GENERATE = [sys.executable, "-m", "costeer", "generate", "--prompt", "Hi", "--context", "I like tea.",
            "--max-new-tokens", "1"]
CASES = {
    "smollm2": (GENERATE + ["--llm", "smollm2", "--slm", "smollm2"], "ready in"),
    # The cross-tokenizer pair: its two loads alone, and the whole CLI start (the loads, then the
    # map between the two vocabularies: costeer/vocab.py).
    "gemma-pair": ([sys.executable, "-c", "from costeer.models import load_model; load_model('gemma3-270m'); "
                    "load_model('smollm2'); print('pair ready', flush=True)"], "pair ready"),
    "gemma-cli": (GENERATE + ["--llm", "gemma3-270m", "--slm", "smollm2"], "ready in"),
    "serve": ([sys.executable, "-m", "costeer", "serve", "--host", "127.0.0.1", "--port", "0", "--model", "smollm2"],
              "listening on"),
}


def time_to_ready(cmd, marker: str, cache: Path, timeout: float) -> dict:
    """Seconds from starting ``cmd`` to the first output line containing ``marker``; the process is
    then left to finish (generate) or stopped (serve)."""
    env = dict(os.environ, COSTEER_MODEL_CACHE=str(cache), TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    ready = None
    lines = []
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        for line in proc.stdout:
            lines.append(line.rstrip())
            if ready is None and marker in line:
                ready = time.perf_counter() - t0
                if "listening on" in marker:
                    proc.terminate()
        proc.wait()
    finally:
        timer.cancel()
    if ready is None:
        raise RuntimeError(f"{' '.join(cmd[2:])}: no {marker!r} line (exit {proc.returncode}):\n" + "\n".join(lines[-20:]))
    built = [ln for ln in lines if "first use: de-quantizing" in ln]
    return {"ready_s": round(ready, 2), "built": len(built), "exit": proc.returncode}


def hash_timing(cache: Path) -> dict:
    """sha256 of the SmolLM2 GGUF file: computed (what a warm start would pay without the remembered
    hash) against remembered."""
    from costeer import model_cache as mc
    from costeer.models import resolve_model

    where, name = resolve_model("smollm2")
    gguf = Path(where) / name
    with tempfile.TemporaryDirectory(dir=cache.parent) as fresh:
        t = time.perf_counter()
        mc.gguf_sha256(gguf, fresh)
        computed = time.perf_counter() - t
        t = time.perf_counter()
        mc.gguf_sha256(gguf, fresh)
        remembered = time.perf_counter() - t
    return {"gguf_mb": round(gguf.stat().st_size / 1e6), "computed_s": round(computed, 4),
            "remembered_s": round(remembered, 5)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    ap.add_argument("--warm-runs", type=int, default=2, help="warm starts per case (median reported)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per start")
    ap.add_argument("--out", default=None, help="JSON output file")
    args = ap.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        ap.error(f"--cases: unknown {unknown}; choose from {list(CASES)}")
    if args.warm_runs < 1:
        ap.error("--warm-runs must be >= 1")
    info = machine_info("cpu")
    rows = []
    work = Path(tempfile.mkdtemp(prefix="costeer-startup-"))
    try:
        for case in cases:
            cmd, marker = CASES[case]
            cache = work / case
            cache.mkdir()
            cold = time_to_ready(cmd, marker, cache, args.timeout)
            warm = [time_to_ready(cmd, marker, cache, args.timeout) for _ in range(args.warm_runs)]
            warm_s = statistics.median(w["ready_s"] for w in warm)
            row = {"case": case, "cold_s": cold["ready_s"], "warm_s": round(warm_s, 2),
                   "warm_runs": [w["ready_s"] for w in warm], "ratio": round(warm_s / cold["ready_s"], 3),
                   "cold_built": cold["built"], "warm_built": sum(w["built"] for w in warm)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        hashes = hash_timing(work / "hash")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nmachine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}; git {git_rev()}")
    print("| start | cold (s) | warm (s), median | warm / cold |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['cold_s']:.1f} | {r['warm_s']:.1f} ({', '.join(f'{w:.1f}' for w in r['warm_runs'])}) "
              f"| {r['ratio']:.3f} |")
    print(f"GGUF sha256 ({hashes['gguf_mb']} MB): computed {hashes['computed_s']:.3f} s, "
          f"remembered {hashes['remembered_s'] * 1e3:.2f} ms")
    out = Path(args.out) if args.out else RESULTS_DIR / machine_slug(info) / "startup.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "git": git_rev(), "rows": rows, "gguf_hash": hashes,
                               "command": "python bench/bench_startup.py " + " ".join(argv or sys.argv[1:])},
                              indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
