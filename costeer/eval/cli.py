"""``costeer eval``: personalization quality of the systems on evaluation items (docs/eval.md)."""
from __future__ import annotations

import argparse
import os
import sys

T_SWEEP = (1, 2, 3, 5, 10)


def add_eval_parser(sub) -> None:
    """Register the ``eval`` sub-command on the ``costeer`` parser's sub-parsers."""
    e = sub.add_parser("eval", help="evaluate personalization quality (LLM alone, small model, CoSteer over T, ...)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("--data", action="append", default=None, metavar="FILE",
                   help="JSONL items, simple or LongLaMP-style (repeatable; default: the project's own set)")
    e.add_argument("--longlamp", default=None, metavar="DIR", help="a local copy of the public LongLaMP files")
    e.add_argument("--task", default="product_review", choices=("abstract_generation", "product_review", "topic_writing"),
                   help="LongLaMP task (with --longlamp)")
    e.add_argument("--split", default="val", help="LongLaMP split (with --longlamp)")
    e.add_argument("--k", type=int, default=3, help="profile records retrieved (BM25, on the device) per item")
    e.add_argument("--limit", type=int, default=None, help="only the first N items")
    e.add_argument("--out", default="eval_out", help="output folder (results.jsonl, table.md, results.csv, "
                                                     "summary.json, quality_vs_T.png, quality_vs_speed.png)")
    e.add_argument("--systems", nargs="+", default=None,
                   help="systems: llm, slm+ctx, llm+ctx, KIND@T=N with KIND costeer, gate, spec, topk-restrict, "
                        "topk-floor, xtok; xtok-llm, xtok-llm+ctx (the --xtok-pair's LLM alone / with the context) "
                        "(default: the baselines, costeer over --T-sweep, the rest at the CLI's T, the pair's "
                        "baselines)")
    e.add_argument("--T-sweep", type=int, nargs="+", default=list(T_SWEEP), help="T values of the CoSteer sweep")
    e.add_argument("--max-new-tokens", type=int, default=32)
    e.add_argument("--llm", default="smollm2", help="LLM (in process)")
    e.add_argument("--slm", default="smollm2", help="small model")
    e.add_argument("--xtok-pair", nargs=2, default=None, metavar=("LLM", "SLM"),
                   help="a pair with different tokenizers for the xtok, xtok-llm and xtok-llm+ctx systems "
                        "(skipped, with a note, without one)")
    e.add_argument("--batch", type=int, default=8, help="items decoded together (1-16); tokens/s is then throughput")
    e.add_argument("--device", default="cpu")
    e.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    e.add_argument("--resume", action="store_true", help="continue the run recorded in --out")
    e.add_argument("--no-plots", action="store_true")
    e.add_argument("--quiet", action="store_true", help="no progress bar or progress lines")


def _say(msg: str) -> None:
    print(f"[costeer eval] {msg}", file=sys.stderr, flush=True)


def run_eval(args) -> int:
    """The ``eval`` sub-command; returns the exit status."""
    from ..cli import CLI_DEFAULTS

    from .data import DataError, load_longlamp, project_set, read_items
    from .runner import EvalError, System, default_systems, evaluate

    def err(msg):
        print(f"costeer eval: error: {msg}", file=sys.stderr, flush=True)
        return 2

    if args.max_new_tokens < 1:
        return err("--max-new-tokens must be >= 1")
    if args.limit is not None and args.limit < 1:
        return err("--limit must be >= 1")
    if args.threads is not None and args.threads < 1:
        return err("--threads must be >= 1")
    if args.k < 1:
        return err("--k must be >= 1")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        if args.longlamp:
            items = load_longlamp(args.longlamp, args.task, args.split, k=args.k, limit=args.limit)
        elif args.data:
            items = [it for p in args.data for it in read_items(p, k=args.k)]
        else:
            items = project_set(k=args.k)
        items = items[:args.limit] if args.limit else items
        systems = args.systems or default_systems(args.T_sweep, CLI_DEFAULTS["T"])
        for s in systems:
            System.parse(s)
        say = (lambda m: None) if args.quiet else _say
        say(f"{len(items)} items, systems: {', '.join(systems)}")
        summary = evaluate(items, args.out, systems, max_new_tokens=args.max_new_tokens, llm=args.llm, slm=args.slm,
                           xtok_pair=args.xtok_pair, device=args.device, batch=args.batch, resume=args.resume,
                           progress=not args.quiet, plots=not args.no_plots, say=say)
    except (DataError, EvalError, ValueError, TypeError) as exc:
        return err(str(exc))
    with open(os.path.join(args.out, "table.md"), encoding="utf-8") as f:
        sys.stdout.write(f.read())
    say(f"{summary['results']} results; report in {args.out}/")
    return 0
