"""Command line: ``costeer generate`` and ``costeer serve`` (also ``python -m costeer``)."""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import textwrap
import time
from typing import List, Optional

# CLI defaults for one model in both roles (the embedded SmolLM2-135M-Instruct pair), chosen from
# the measured sweep in docs/defaults_sweep.md. The op's own defaults stay the paper's (T=20,
# alpha=2, beta=1, lambda=2, eta=10, c_T = 1.78), which garbles text with the same model twice.
CLI_DEFAULTS = dict(T=3, alpha=2.0, beta=1.0, lam=2.0, eta=10.0)

MODE_TITLES = {"llm": "LLM only (public prompt)", "slm": "small model + context", "costeer": "CoSteer"}


def _err(msg: str) -> None:
    print(f"costeer: error: {msg}", file=sys.stderr, flush=True)


def _progress(msg: str) -> None:
    print(f"[costeer] {msg}", file=sys.stderr, flush=True)


def _build_generate_parser(sub):
    g = sub.add_parser("generate", help="generate an answer steered by a private context",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g.add_argument("--prompt", required=True, help="the public prompt (the only text the LLM sees)")
    g.add_argument("--context-file", default=None, help="file with the private context (read by the small model only)")
    g.add_argument("--context", default=None, help="the private context as text (instead of --context-file)")
    g.add_argument("--llm", default="smollm2", help="LLM: alias, Hugging Face id or local path (in process)")
    g.add_argument("--slm", default="smollm2", help="small model: alias, Hugging Face id or local path")
    g.add_argument("--llm-url", default=None,
                   help="remote LLM: ws://HOST:PORT of `costeer serve`, or http(s)://HOST:PORT of an "
                        "OpenAI-compatible completions endpoint (vLLM, SGLang)")
    g.add_argument("--remote-model", default=None, help="model name for an OpenAI-compatible endpoint")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--speculative", default=None, metavar="K",
                   help="speculative steering: draft K tokens on the device per cloud round trip "
                        "(an integer, or 'auto': adapted to the acceptance rate); same output, fewer round trips")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--compare", action="store_true",
                   help="also run the LLM alone and the small model with the context; show all three side by side")
    g.add_argument("--T", type=int, default=CLI_DEFAULTS["T"], help="steering iterations (strength)")
    g.add_argument("--alpha", type=float, default=CLI_DEFAULTS["alpha"])
    g.add_argument("--beta", type=float, default=CLI_DEFAULTS["beta"])
    g.add_argument("--lam", type=float, default=CLI_DEFAULTS["lam"])
    g.add_argument("--eta", type=float, default=CLI_DEFAULTS["eta"])
    g.add_argument("--format", dest="response_format", choices=("full", "topk"), default="full",
                   help="costeer serve answers: full vocabulary or top-k")
    g.add_argument("--dtype", dest="transport_dtype", choices=("float16", "bfloat16", "float32"), default="float16",
                   help="costeer serve full-vocabulary wire dtype")
    g.add_argument("--topk", type=int, default=20, help="k for top-k answers")
    g.add_argument("--topk-policy", choices=("restrict", "floor"), default="restrict",
                   help="tokens outside a top-k answer: banned (restrict) or given the leftover mass (floor)")
    g.add_argument("--device", default="cpu")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for a remote LLM")
    g.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def _side_by_side(columns: List[tuple], width: Optional[int] = None) -> str:
    width = width or shutil.get_terminal_size((120, 20)).columns
    n = len(columns)
    colw = max(20, (width - 3 * (n - 1)) // n)
    wrapped = []
    for title, text in columns:
        lines = [title[:colw], "-" * min(colw, max(len(title), 8))]
        for para in (text or "").split("\n"):
            lines.extend(textwrap.wrap(para, colw) or [""])
        wrapped.append(lines)
    rows = max(len(w) for w in wrapped)
    out = []
    for r in range(rows):
        out.append(" | ".join((w[r] if r < len(w) else "").ljust(colw) for w in wrapped).rstrip())
    return "\n".join(out)


def _generate(args) -> int:
    from costeer_kernels import SteerConfig

    from .generator import GenerationError, Generator
    from .models import ModelNotFoundError
    from .streams import StreamError

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.context_file is not None and args.context is not None:
        _err("give --context-file or --context, not both")
        return 2
    context = args.context or ""
    if args.context_file is not None:
        try:
            with open(args.context_file, encoding="utf-8") as f:
                context = f.read()
        except OSError as exc:
            _err(f"--context-file: {exc}")
            return 2
    if not args.prompt.strip():
        _err("--prompt must be a non-empty string")
        return 2
    if args.max_new_tokens < 1:
        _err("--max-new-tokens must be >= 1")
        return 2
    say = (lambda m: None) if args.quiet else _progress
    try:
        cfg = SteerConfig(T=args.T, alpha=args.alpha, beta=args.beta, lam=args.lam, eta=args.eta)
        t0 = time.perf_counter()
        where = args.llm_url or f"{args.llm} (in process)"
        say(f"loading small model {args.slm}, LLM {where} ...")
        gen = Generator(llm=args.llm if args.llm_url is None or args.llm != "smollm2" else None, slm=args.slm,
                        llm_url=args.llm_url, remote_model=args.remote_model, cfg=cfg, device=args.device,
                        response_format=args.response_format, transport_dtype=args.transport_dtype, topk=args.topk,
                        topk_policy=args.topk_policy, timeout=args.timeout)
        say(f"ready in {time.perf_counter() - t0:.1f} s; steering c_T = {cfg.coefficient:.3f} (T={cfg.T}); "
            f"context: {len(context)} characters, never sent to the LLM")
    except (ModelNotFoundError, ValueError, TypeError, StreamError) as exc:
        _err(str(exc))
        return 2
    if args.speculative is not None:  # speculative steering (costeer/speculative.py)
        from .speculative import SpeculativeCLI

        try:
            gen = SpeculativeCLI(gen, args.speculative)
        except ValueError as exc:
            _err(str(exc))
            return 2
    modes = ["llm", "slm", "costeer"] if args.compare else ["costeer"]
    texts = {}
    status = 0
    for mode in modes:
        if args.compare:
            print(f"\n=== {MODE_TITLES[mode]} ===", flush=True)

        def on_text(_i, s):
            sys.stdout.write(s)
            sys.stdout.flush()

        try:
            res = gen.generate(args.prompt, context=context, max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                               stop=args.stop or (), mode=mode, on_text=on_text)
        except GenerationError as exc:
            res = exc.results[0]
            sys.stdout.write("\n")
            _err(f"{exc}")
            status = 1
        except (ValueError, TypeError, StreamError) as exc:
            sys.stdout.write("\n")
            _err(str(exc))
            return 2
        sys.stdout.write("\n")
        sys.stdout.flush()
        texts[mode] = res.text
        t = res.timing_summary()
        parts = [f"local {t['local_ms']:.1f}", f"steer {t['steer_ms']:.2f}"] if mode != "llm" else []
        if mode == "costeer" and gen.llm is not None and gen.llm.model is gen.slm.model:
            parts[0] = f"local incl. co-batched LLM rows {t['local_ms']:.1f}"
        elif mode != "slm":
            parts.insert(0, f"LLM wait {t['llm_ms']:.1f}")
            if args.llm_url:
                parts.insert(1, f"transport {t['transport_ms']:.1f}")
        say(f"{MODE_TITLES[mode]}: {len(res.token_ids)} tokens in {res.elapsed_s:.2f} s "
            f"({res.tokens_per_s:.1f} tokens/s; prefill {t['prefill_ms']:.0f} ms; per step ms: {', '.join(parts)}; "
            f"finish: {res.finish_reason})")
    if args.compare:
        print()
        print(_side_by_side([(MODE_TITLES[m], texts.get(m, "")) for m in modes]))
    if args.speculative is not None:
        print(gen.summary(), flush=True)  # ends with "round trips/token: X"
    return status


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="costeer", description="CoSteer: a cloud LLM steered by a local small model that reads a private context.")
    sub = ap.add_subparsers(dest="command", metavar="{generate,serve}")
    _build_generate_parser(sub)
    sub.add_parser("serve", help="serve an LLM's next-token logits over WebSocket (see `costeer serve -h`)", add_help=False)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        from .server import main as serve_main

        return serve_main(argv[1:])
    args = ap.parse_args(argv)
    if args.command is None:
        ap.print_help()
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return _generate(args)
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
