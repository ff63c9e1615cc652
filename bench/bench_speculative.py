"""Speculative steering vs the normal CoSteer loop: round trips per token, acceptance, tokens/s,
identical greedy text; plus the per-forward costs the estimate in docs/speculative.md starts from.

    python bench/bench_speculative.py [--max-new-tokens 32] [--ks 1,2,4,8,auto] [--repeats 2]
                                      [--threads N] [--proposal ctx] [--T 3] [--json FILE]

SmolLM2-135M-Instruct in both roles, CLI steering defaults (T=3), greedy, in process. Round trips
per token = LLM calls (prefill + scoring rounds) / decided tokens (output tokens + a final EOS); the
normal loop makes one LLM call per decided token (1.0). tokens/s = output tokens / wall time of
the whole generation (prefill included), best of --repeats, configurations interleaved.
"""
import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from costeer import Generator  # noqa: E402
from costeer.cli import CLI_DEFAULTS  # noqa: E402
from costeer.models import load_model  # noqa: E402
from costeer.kv import KVBatch  # noqa: E402
from costeer.speculative import Speculation, parse_k  # noqa: E402
from costeer_kernels import SteerConfig  # noqa: E402

CASES = [
    ("Suggest a weekend activity for me.", "I live in Zurich. I love hiking in the mountains and photography."),
    ("What should I cook for dinner tonight?", "I am vegan and allergic to peanuts. I like spicy Thai food."),
    ("Recommend a book for me.", "My favourite genre is science fiction; I enjoyed Dune and The Expanse."),
]


def forward_costs(smol, repeats=7):
    """Median ms of: the LLM's 1-token step and n-token extend (1 row); a local step (2 rows)."""
    tok = smol.tokenizer
    a = tok("Suggest a weekend activity for me, please. I have a free Saturday.")["input_ids"]
    b = tok("Here is some information about me: I live in Zurich. Suggest a weekend activity.")["input_ids"]
    out = {}

    def med(fn):
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            ts.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(ts)

    llm = KVBatch(smol.model, [a], smol.pad_token_id)
    llm.prefill()
    for n in (1, 2, 3, 5, 9):
        def f(n=n):
            llm.extend([[42] * n])
            llm.rollback(n)
        out[f"llm_{n}tok_ms"] = med(f)
    loc = KVBatch(smol.model, [a, b], smol.pad_token_id)
    loc.prefill()

    def g():
        loc.step([42, 42])
        loc.rollback(1)
    out["local_step_2rows_ms"] = med(g)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--ks", default="1,2,4,8,auto")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--proposal", default="ctx", choices=("ctx", "proxy"))
    ap.add_argument("--T", type=int, default=CLI_DEFAULTS["T"], help="steering strength (CLI default 3; paper 20)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ks = [parse_k(x) for x in args.ks.split(",")]
    smol = load_model("smollm2")
    cfg = SteerConfig(**dict(CLI_DEFAULTS, T=args.T))
    gens = {"normal (co-batched)": Generator(llm=smol, slm=smol, cfg=cfg),
            "normal (separate LLM forward)": Generator(llm=smol, slm=smol, cfg=cfg, cobatch=False)}
    M = args.max_new_tokens
    gens["normal (co-batched)"].generate(CASES[0][0], context=CASES[0][1], max_new_tokens=4)  # warm up
    ref = {p: gens["normal (co-batched)"].generate(p, context=c, max_new_tokens=M) for p, c in CASES}
    configs = list(gens) + [f"speculative k={k}" for k in ks]
    best = {c: None for c in configs}
    stats = {}
    for rep in range(args.repeats):
        for c in configs:
            print(f"  [{rep + 1}/{args.repeats}] {c} ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            n_tok, agg = 0, dict(decided=0, llm_calls=0, drafted=0, accepted=0, cloud_tokens=0, rounds=0, ks=[])
            identical = True
            for p, ctx in CASES:
                if c in gens:
                    res = gens[c].generate(p, context=ctx, max_new_tokens=M)
                    agg["decided"] += len(res.token_ids) + (res.finish_reason == "eos")
                    agg["llm_calls"] += len(res.token_ids) + (res.finish_reason == "eos")
                    agg["cloud_tokens"] += len(res.token_ids) + (res.finish_reason == "eos")
                else:
                    k = parse_k(c.split("=")[1])
                    res = gens["normal (co-batched)"].generate(p, context=ctx, max_new_tokens=M,
                                                               speculative=Speculation(k, proposal=args.proposal))
                    for key in ("decided", "llm_calls", "drafted", "accepted", "cloud_tokens", "rounds"):
                        agg[key] += getattr(res, key)
                    agg["ks"] += res.ks
                identical &= res.token_ids == ref[p].token_ids
                n_tok += len(res.token_ids)
            dt = time.perf_counter() - t0
            tps = n_tok / dt
            if best[c] is None or tps > best[c]:
                best[c] = tps
            stats[c] = dict(agg, tokens=n_tok, identical=identical)
    costs = forward_costs(smol)
    rows = []
    base = best["normal (co-batched)"]
    print(f"\nSmolLM2-135M-Instruct in both roles, greedy, T={args.T} (c={cfg.coefficient:.3f}), {len(CASES)} prompts x {M} tokens, "
          f"torch threads {torch.get_num_threads()}, best of {args.repeats}, proposal {args.proposal}\n")
    print("| configuration | identical text | acceptance | round trips/token | cloud forward tokens/token | mean k | tokens/s | vs co-batched |")
    print("|---|---|---|---|---|---|---|---|")
    for c in configs:
        s = stats[c]
        acc = s["accepted"] / s["drafted"] if s["drafted"] else float("nan")
        rt = s["llm_calls"] / s["decided"]
        ct = s["cloud_tokens"] / s["decided"]
        mk = sum(s["ks"]) / len(s["ks"]) if s["ks"] else float("nan")
        print(f"| {c} | {'yes' if s['identical'] else 'NO'} | {acc:.2f} | {rt:.3f} | {ct:.2f} | {mk:.1f} | "
              f"{best[c]:.1f} | {best[c] / base:.2f}x |")
        rows.append(dict(config=c, acceptance=acc, round_trips_per_token=rt, cloud_tokens_per_token=ct, mean_k=mk,
                         tokens_per_s=best[c], **{k: v for k, v in s.items() if k != "ks"}))
    print("\nper-forward costs (median ms): " + ", ".join(f"{k} {v:.1f}" for k, v in costs.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, costs=costs, max_new_tokens=M, T=args.T, threads=torch.get_num_threads(),
                           proposal=args.proposal, prompts=len(CASES)), f, indent=1)


if __name__ == "__main__":
    main()
