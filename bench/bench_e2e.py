"""End-to-end decoding speed: LLM alone, the plain reference loop, CoSteer in process and through
`costeer serve` on loopback. Same models, same prompts, same run.

    python bench/bench_e2e.py [--max-new-tokens 32] [--repeats 2] [--threads N] [--no-server]

tokens/s = generated tokens / wall time of the whole generation (prefill included), best of
--repeats; "ms/step" is the mean decode step (prefill excluded). The server runs in a subprocess on
127.0.0.1 (started and stopped here) and competes for the same CPU cores as the client.
"""
import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from costeer import Generator  # noqa: E402
from costeer.cli import CLI_DEFAULTS  # noqa: E402
from costeer.models import load_model  # noqa: E402
from costeer.reference_loop import reference_generate  # noqa: E402
from costeer_kernels import SteerConfig  # noqa: E402

CASES = [
    ("Suggest a weekend activity for me.", "I live in Zurich. I love hiking in the mountains and photography."),
    ("What should I cook for dinner tonight?", "I am vegan and allergic to peanuts. I like spicy Thai food."),
]


def start_server(threads):
    cmd = [sys.executable, "-m", "costeer", "serve", "--host", "127.0.0.1", "--port", "0"]
    if threads:
        cmd += ["--threads", str(threads)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=ROOT)
    deadline = time.time() + 300
    while time.time() < deadline:
        line = proc.stdout.readline()
        if "listening on ws://" in line:
            return proc, line.strip().split("listening on ")[1]
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError("costeer serve did not start")


def measure(fn, repeats, label=""):
    print(f"  measuring {label} ...", file=sys.stderr, flush=True)
    best = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        n, step_ms = fn()
        dt = time.perf_counter() - t0
        if best is None or n / dt > best[0]:
            best = (n / dt, n, dt, step_ms)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-server", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    N = args.max_new_tokens
    cfg = SteerConfig(**CLI_DEFAULTS)
    smol = load_model("smollm2")
    rows = []

    def gen_fn(gen, mode="costeer"):
        def run():
            n, steps = 0, []
            for p, c in CASES:
                r = gen.generate(p, context=c, max_new_tokens=N, mode=mode)
                n += len(r.token_ids)
                steps.append(r.timing_summary()["total_ms"])
            return n, sum(steps) / len(steps)
        return run

    def ref_fn():
        n = 0
        for p, c in CASES:
            n += len(reference_generate(smol, smol, p, c, cfg=cfg, max_new_tokens=N))
        return n, float("nan")

    inproc = Generator(llm=smol, slm=smol, cfg=cfg)
    separate = Generator(llm=smol, slm=smol, cfg=cfg, cobatch=False)
    configs = [
        ("LLM only (in process)", gen_fn(inproc, "llm")),
        ("reference loop (3 passes, eager T-step update)", ref_fn),
        ("CoSteer in process (co-batched, 1 forward/step)", gen_fn(inproc)),
        ("CoSteer in process (separate LLM forward)", gen_fn(separate)),
    ]
    proc = None
    remotes = []
    try:
        if not args.no_server:
            proc, url = start_server(args.threads)
            for label, kw in (("full fp16", {}), ("top-20", {"response_format": "topk", "topk": 20})):
                remote = Generator(llm=None, slm=smol, llm_url=url, cfg=cfg, **kw)
                remotes.append(remote)
                configs.append((f"CoSteer via costeer serve, loopback ({label})", gen_fn(remote)))
        gen_fn(inproc)()  # warm-up
        for r in remotes:
            gen_fn(r)()
        # Interleaved rounds (the machine is shared): best of --repeats per configuration.
        best = {}
        for rnd in range(args.repeats):
            print(f"  round {rnd + 1}/{args.repeats}", file=sys.stderr, flush=True)
            for label, fn in configs:
                t0 = time.perf_counter()
                n, step_ms = fn()
                dt = time.perf_counter() - t0
                if label not in best or n / dt > best[label][0]:
                    best[label] = (n / dt, n, dt, step_ms)
        rows = [(label,) + best[label] for label, _ in configs]
    finally:
        for r in remotes:
            r.close()
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=20)
    ref = rows[1][1]
    print(f"\nmachine: {os.cpu_count()} CPU cores, torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"model: SmolLM2-135M-Instruct (both roles); cfg {CLI_DEFAULTS}; {len(CASES)} prompts x {N} new tokens, "
          f"best of {args.repeats} interleaved rounds\n")
    print("| configuration | tokens/s | tokens | seconds | ms/step (decode) | vs reference loop |")
    print("|---|---|---|---|---|---|")
    for label, tps, n, dt, step in rows:
        st = "-" if step != step else f"{step:.1f}"
        print(f"| {label} | {tps:.1f} | {n} | {dt:.2f} | {st} | {tps / ref:.2f}x |")


if __name__ == "__main__":
    main()
