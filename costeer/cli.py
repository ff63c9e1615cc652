"""Command line: ``costeer generate`` and ``costeer serve`` (also ``python -m costeer``)."""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import textwrap
import time
from typing import List, Optional

from .startup import pause_gc, resume_gc

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
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely steered tokens (0 = off)")
    g.add_argument("--min-p", type=float, default=0.0, help="keep tokens with probability >= min-p x the top one (0 = off)")
    g.add_argument("--unmapped", choices=("keep", "drop"), default="keep",
                   help="LLM and small model with different tokenizers: LLM tokens without a small-model "
                        "counterpart keep their LLM logit (keep) or are excluded (drop)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--speculative", default=None, metavar="K",
                   help="speculative steering: draft K tokens on the device per cloud round trip "
                        "(an integer, or 'auto': adapted to the acceptance rate); same output, fewer round trips")
    g.add_argument("--proposal", default="ctx", choices=("ctx", "proxy", "cloud"),
                   help="--speculative: who drafts. ctx: the small model with the context (default); proxy: steered "
                        "by the small model without it; cloud: the LLM itself decodes K+1 tokens per request (one "
                        "max_tokens request on its prefix cache; an integer K)")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--compare", action="store_true",
                   help="also run the LLM alone and the small model with the context; show all three side by side")
    g.add_argument("--T", type=int, default=CLI_DEFAULTS["T"], help="steering iterations (strength)")
    g.add_argument("--alpha", type=float, default=CLI_DEFAULTS["alpha"])
    g.add_argument("--beta", type=float, default=CLI_DEFAULTS["beta"])
    g.add_argument("--lam", type=float, default=CLI_DEFAULTS["lam"])
    g.add_argument("--eta", type=float, default=CLI_DEFAULTS["eta"])
    g.add_argument("--gate", action="store_true",
                   help="confidence gating (AdaCoSteer): stop the small model once the LLM is confident")
    g.add_argument("--gate-threshold", type=float, default=0.9, help="LLM max probability that counts as confident")
    g.add_argument("--gate-patience", type=int, default=3, help="confident tokens in a row before the small model stops")
    g.add_argument("--gate-reenable", action="store_true", help="a non-confident token switches steering back on")
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
    g.add_argument("--token", default=None, help="token of a `costeer serve` that requires one (default: $COSTEER_TOKEN)")
    g.add_argument("--ca-file", default=None, metavar="PEM",
                   help="wss:// server certificates are verified against this CA (or self-signed certificate) file "
                        "instead of the system's CAs (default: $COSTEER_CA_FILE)")
    g.add_argument("--api-key", default=None,
                   help="API key of an OpenAI-compatible endpoint (default: $COSTEER_API_KEY, then $OPENAI_API_KEY)")
    g.add_argument("--score", default="prompts", choices=("prompts", "prompt_logprobs"),
                   help="--speculative through an OpenAI-compatible endpoint: score the drafts as one prompt per "
                        "drafted token (the engine's prefix cache computes their tails; default) or with vLLM's "
                        "prompt_logprobs over the whole sequence")
    g.add_argument("--reconnect-timeout", type=float, default=None,
                   help="seconds to keep reconnecting (bounded backoff) when the connection to `costeer serve` "
                        "or an OpenAI-compatible endpoint breaks mid-generation; the generation then resumes where it was "
                        "(default: 30 for costeer serve, 300 for an OpenAI-compatible engine, which takes minutes to restart)")
    g.add_argument("--output", default=None, metavar="FILE",
                   help="append the generated text to FILE as it is produced; FILE.journal beside it records "
                        "each token id, so that --resume can continue after any interruption")
    g.add_argument("--resume", action="store_true",
                   help="continue the generation recorded in --output FILE (same prompt, context and settings)")
    g.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    g.add_argument("--model-cache", default=None, metavar="DIR",
                   help="model cache folder for de-quantized GGUF models (default: $COSTEER_MODEL_CACHE or "
                        "~/.cache/costeer/models; see `costeer models`)")


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


class _CliError(Exception):
    pass


class _Output:
    """``--output FILE``: the text, appended as produced, and ``FILE.journal`` (JSON lines).

    Journal: a header ``{"costeer_output": 1, "key": ..., "seed": ...}``, then one
    ``{"t": token_id, "b": bytes of FILE after this token's text}`` per generated token (written
    after the text, both flushed), and ``{"done": finish_reason}`` at the end. ``--resume`` keeps
    the tokens of whole journal lines, cuts FILE back to the last recorded byte count, re-runs those
    tokens as the generation's prefix (``Generator.stream(prefix=...)``) without writing their text
    again, and appends what follows: the result equals an uninterrupted run.
    """

    def __init__(self, path: str, key: str, resume: bool, seed):
        import json

        self.path, self.jpath = path, path + ".journal"
        self.prefix: List[int] = []
        self.done = None
        self.seed = seed
        self.skip = 0  # characters of re-produced text already in FILE
        self.existing = ""
        self.llm = None  # the LLM the journal was written with (see ``bind_llm``)
        if not resume:
            # "x": created here or refused (no check-then-open race; a symlink, even dangling, is
            # an existing file). The journal first: a name too long for it leaves no FILE behind.
            try:
                self.journal = open(self.jpath, "x", encoding="utf-8")
            except FileExistsError:
                raise _CliError(f"--output: {self.jpath} exists; continue it with --resume or remove it first") from None
            try:
                self.text = open(self.path, "xb")
            except OSError as exc:
                self.journal.close()
                os.unlink(self.jpath)
                if isinstance(exc, FileExistsError):
                    raise _CliError(f"--output: {self.path} exists; continue it with --resume or remove it first") from None
                raise
            self._line({"costeer_output": 1, "key": key, "seed": seed})
            return
        if not os.path.isfile(self.jpath):
            raise _CliError(f"--resume: no journal {self.jpath} (start with --output {path} without --resume)")
        good, size_b = 0, 0
        with open(self.jpath, "rb") as f:
            raw = f.read()
        header = None
        for line in raw.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break  # a torn last line: the process died while writing it
            try:
                rec = json.loads(line)
            except ValueError:
                break
            if header is None:
                header = rec
                if not isinstance(rec, dict) or rec.get("costeer_output") != 1:
                    raise _CliError(f"--resume: {self.jpath} is not a costeer journal")
                if rec.get("key") != key:
                    raise _CliError(f"--resume: {self.jpath} was written for another prompt, context, model or "
                                    f"settings; give the same ones as the first run")
                self.seed = rec.get("seed")
            elif isinstance(rec, dict) and set(rec) == {"llm"} and self.llm is None:
                self.llm = rec["llm"]
            elif isinstance(rec, dict) and _is_count(rec.get("t")) and _is_count(rec.get("b")) and rec["b"] >= size_b:
                self.prefix.append(rec["t"])
                size_b = rec["b"]
            elif isinstance(rec, dict) and "done" in rec and len(rec) == 1:
                self.done = rec["done"]
            else:
                lineno = raw[:good].count(b"\n") + 1
                raise _CliError(f"--resume: {self.jpath} line {lineno} is not a journal record "
                                f"({line[:60]!r}): the file was edited or damaged; its text so far is in {path}")
            good += len(line)
        if header is None:
            raise _CliError(f"--resume: {self.jpath} has no header line")
        if not os.path.isfile(self.path) or os.path.getsize(self.path) < size_b:
            raise _CliError(f"--resume: {self.path} is shorter than its journal records ({size_b} bytes)")
        with open(self.path, "r+b") as f:  # text written after the last journaled token is produced again
            f.truncate(size_b)
            self.existing = f.read().decode("utf-8", errors="replace")
        self.skip = len(self.existing)
        with open(self.jpath, "r+b") as f:
            f.truncate(good)
        self.text = open(self.path, "ab")
        self.journal = open(self.jpath, "a", encoding="utf-8")

    def bind_llm(self, name: str) -> None:
        """Record the LLM actually reached (a server's model answers in its hello) or, resuming,
        refuse another one than the journal's."""
        if self.llm is None:
            self.llm = name
            self._line({"llm": name})
        elif self.llm != name:
            raise _CliError(f"--resume: {self.jpath} was generated by {self.llm}, not {name}: resume against the "
                            f"same model")

    def _line(self, rec):
        import json

        self.journal.write(json.dumps(rec) + "\n")
        self.journal.flush()

    def write_text(self, s: str) -> str:
        """Append ``s`` minus what a resumed run re-produces; returns the part that is new."""
        if self.skip:
            n = min(self.skip, len(s))
            self.skip -= n
            s = s[n:]
        if s:
            self.text.write(s.encode("utf-8"))
            self.text.flush()
        return s

    def token(self, index: int, tok: int):
        if index >= len(self.prefix):
            self._line({"t": int(tok), "b": self.text.tell()})

    def finish(self, reason):
        if self.text.closed:
            return
        if reason and reason != "error":
            self._line({"done": reason})
        for f in (self.text, self.journal):
            try:
                f.flush()
                os.fsync(f.fileno())
            except OSError:
                pass
            try:
                f.close()
            except OSError:  # a full disk: what the journal holds is resumable, the rest is redone
                pass


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _output_key(args, context: str) -> str:
    import hashlib
    import json

    fields = {k: getattr(args, k) for k in ("prompt", "llm", "slm", "T", "alpha", "beta", "lam", "eta", "temperature",
                                             "top_p", "seed", "stop", "response_format", "transport_dtype", "topk",
                                             "topk_policy", "top_k", "min_p", "unmapped", "llm_url", "remote_model",
                                             "gate", "gate_threshold", "gate_patience", "gate_reenable")}
    fields["context"] = context
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode("utf-8")).hexdigest()


def _generate(args) -> int:
    from costeer_kernels import SteerConfig

    from .types import GenerationError
    from .loop import Generator
    from .models import ModelNotFoundError
    from .llm import StreamError

    if args.model_cache:
        from .model_cache import ENV_VAR

        os.environ[ENV_VAR] = args.model_cache  # read wherever a GGUF model is loaded
    if args.threads is not None and args.threads < 1:
        _err("--threads must be >= 1")
        return 2
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
    if args.reconnect_timeout is not None and args.reconnect_timeout < 0:
        _err("--reconnect-timeout must be >= 0 seconds")
        return 2
    if not args.timeout > 0:
        _err("--timeout must be > 0 seconds")
        return 2
    if args.ca_file is not None:  # read by the costeer serve client (WebSocketLLMStream)
        from .llm import CA_ENV

        os.environ[CA_ENV] = args.ca_file
    if args.resume and not args.output:
        _err("--resume needs --output FILE (the file of the run to continue)")
        return 2
    if args.output and args.compare:
        _err("--output records one generation: drop --compare")
        return 2
    out = None
    if args.output:
        seed = args.seed
        if seed is None and args.temperature > 0:  # recorded so that --resume samples the same way
            import secrets

            seed = secrets.randbelow(2**31)
        try:
            out = _Output(args.output, _output_key(args, context), args.resume, seed)
        except (_CliError, OSError) as exc:
            _err(str(exc))
            return 2
        if out.done:
            sys.stdout.write(out.existing + "\n")
            _progress(f"{args.output} is already complete (finish: {out.done}); nothing to resume")
            out.finish(None)
            return 0
        args.seed = out.seed
    say = (lambda m: None) if args.quiet else _progress
    try:
        cfg = SteerConfig(T=args.T, alpha=args.alpha, beta=args.beta, lam=args.lam, eta=args.eta)
        gate = None
        if args.gate or args.gate_reenable:
            from .gating import ConfidenceGate

            gate = ConfidenceGate(threshold=args.gate_threshold, patience=args.gate_patience, reenable=args.gate_reenable)
        t0 = time.perf_counter()
        where = args.llm_url or f"{args.llm} (in process)"
        say(f"loading small model {args.slm}, LLM {where} ...")
        gen = Generator(llm=args.llm if args.llm_url is None or args.llm != "smollm2" else None, slm=args.slm,
                        llm_url=args.llm_url, remote_model=args.remote_model, cfg=cfg, device=args.device,
                        response_format=args.response_format, transport_dtype=args.transport_dtype, topk=args.topk,
                        topk_policy=args.topk_policy, timeout=args.timeout, gate=gate, token=args.token,
                        reconnect_timeout=args.reconnect_timeout, unmapped=args.unmapped, api_key=args.api_key,
                        score=args.score)
        resume_gc()  # the models are loaded (costeer/startup.py); counted in "ready in"
        if gen.coverage is not None:
            cov = gen.coverage
            say(f"different tokenizers: {cov['matched']} of {cov['llm_size']} LLM tokens ({100 * cov['llm_coverage']:.1f}%) "
                f"have a small-model counterpart ({100 * cov['slm_coverage']:.1f}% of the small model's "
                f"{cov['slm_size']}); the others: {args.unmapped}")
        say(f"ready in {time.perf_counter() - t0:.1f} s; steering c_T = {cfg.coefficient:.3f} (T={cfg.T}); "
            f"context: {len(context)} characters, never sent to the LLM")
        if out is not None:
            out.bind_llm(gen.llm_name)  # the server's model (from its hello) is part of what is resumed
    except (ModelNotFoundError, ValueError, TypeError, StreamError, _CliError, OSError) as exc:
        _err(str(exc))
        if out is not None:
            out.finish(None)
        return 2
    if out is not None and out.existing:
        sys.stdout.write(out.existing)
        sys.stdout.flush()
        say(f"resuming {args.output}: {len(out.prefix)} tokens already generated")
    spec = None
    if args.speculative is not None:  # the loop's speculative policy (costeer/speculative.py)
        from .speculative import Speculation, parse_k

        try:
            spec = Speculation(parse_k(args.speculative), proposal=args.proposal)
        except ValueError as exc:
            _err(str(exc))
            return 2
    last_spec = None
    modes = ["llm", "slm", "costeer"] if args.compare else ["costeer"]
    texts = {}
    status = 0
    for mode in modes:
        if args.compare:
            print(f"\n=== {MODE_TITLES[mode]} ===", flush=True)

        res = None
        n_tokens = 0
        try:
            for chunk in gen.stream(args.prompt, context=context, max_new_tokens=args.max_new_tokens,
                                    temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                    stop=args.stop or (), mode=mode, prefix=[out.prefix] if out else None,
                                    top_k=args.top_k, min_p=args.min_p,
                                    speculative=spec if mode == "costeer" else None):
                text = out.write_text(chunk.text) if out is not None else chunk.text
                if text:
                    sys.stdout.write(text)
                    sys.stdout.flush()
                if chunk.token is not None:
                    if out is not None:
                        out.token(n_tokens, chunk.token)
                    n_tokens += 1
                if chunk.done:
                    res = chunk.result
        except GenerationError as exc:
            res = exc.results[0]
            sys.stdout.write("\n")
            _err(f"{exc}")
            status = 1
        except (ValueError, TypeError, StreamError) as exc:
            sys.stdout.write("\n")
            _err(str(exc))
            if out is not None:
                out.finish(None)
            return 2
        except OSError as exc:  # writing --output failed (a full disk): every journaled token is kept
            if out is None:
                raise
            sys.stdout.write("\n")
            _err(f"--output: cannot write {args.output}: {exc}")
            _progress(f"the text so far is in {args.output}; continue it with --resume once the disk has room")
            out.finish(None)
            return 1
        finally:
            if out is not None and res is None:
                out.finish(None)  # interrupted (KeyboardInterrupt): what was written stays
        if out is not None:
            out.finish(res.finish_reason)
            if res.finish_reason == "error":
                _progress(f"the text so far is in {args.output}; continue it with --resume")
        sys.stdout.write("\n")
        sys.stdout.flush()
        texts[mode] = res.text
        if spec is not None and mode == "costeer":
            last_spec = res
        t = res.timing_summary()
        parts = [f"local {t['local_ms']:.1f}", f"steer {t['steer_ms']:.2f}"] if mode != "llm" else []
        if mode == "costeer" and spec is None and gen.cobatch and gen.llm is not None and gen.llm.model is gen.slm.model:
            parts[0] = f"local incl. co-batched LLM rows {t['local_ms']:.1f}"
        elif mode != "slm":
            parts.insert(0, f"LLM wait {t['llm_ms']:.1f}")
            if args.llm_url:
                parts.insert(1, f"transport {t['transport_ms']:.1f}")
        if mode == "costeer" and gate is not None:
            say(f"confidence gate ({gate.threshold}, patience {gate.patience}): {res.steered_tokens} of "
                f"{len(res.token_ids) + (res.finish_reason == 'eos')} tokens steered")
        say(f"{MODE_TITLES[mode]}: {len(res.token_ids)} tokens in {res.elapsed_s:.2f} s "
            f"({res.tokens_per_s:.1f} tokens/s; prefill {t['prefill_ms']:.0f} ms; per step ms: {', '.join(parts)}; "
            f"finish: {res.finish_reason})")
    if args.compare:
        print()
        print(_side_by_side([(MODE_TITLES[m], texts.get(m, "")) for m in modes]))
    if spec is not None:  # ends with "round trips/token: X"
        print("speculative: " + (last_spec.spec_summary() if last_spec is not None else "no generation"), flush=True)
    return status


def console_main() -> int:
    """The ``costeer`` script and ``python -m costeer``: ``main()``, then on a normal return
    ``costeer.startup.exit_process`` (the process ends without the interpreter's 1.5 s teardown)."""
    from .startup import exit_process

    return exit_process(main())


def main(argv: Optional[List[str]] = None) -> int:
    """``costeer ...``; ``argv`` None: this process's own command line (``python -m costeer``, the
    ``costeer`` script), whose ``generate`` and ``serve`` start with the cyclic garbage collector
    paused until the models are loaded (``costeer/startup.py``)."""
    if argv is None and sys.argv[1:2] and sys.argv[1] in ("generate", "serve"):
        pause_gc()
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    finally:
        resume_gc()  # an error or an early return before the models were loaded


def _main(argv: List[str]) -> int:
    # serve and models parse their own arguments; dispatched first so that their start does not
    # import the eval package (which imports torch and numpy at once).
    if argv and argv[0] == "serve":
        from .serve.server import main as serve_main

        return serve_main(argv[1:])
    if argv and argv[0] == "models":
        from .model_cache import main as models_main

        return models_main(argv[1:])
    ap = argparse.ArgumentParser(prog="costeer", description="CoSteer: a cloud LLM steered by a local small model that reads a private context.")
    sub = ap.add_subparsers(dest="command", metavar="{generate,serve,models,eval}")
    _build_generate_parser(sub)
    from .eval.cli import add_eval_parser, run_eval  # costeer eval: docs/eval.md

    add_eval_parser(sub)
    sub.add_parser("serve", help="serve an LLM's next-token logits over WebSocket (see `costeer serve -h`)", add_help=False)
    sub.add_parser("models", help="the model cache: list, build (`models path ALIAS`), remove (see `costeer models -h`)",
                   add_help=False)
    args = ap.parse_args(argv)
    if args.command is None:
        ap.print_help()
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if args.command == "eval":
            return run_eval(args)
        return _generate(args)
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
