"""End-to-end decoding benchmark: LLM alone, the plain reference loop, CoSteer in process (batch 1 and a
batch of --batch requests, aggregate tokens/s) and through `costeer serve` on loopback (and speculative steering when ``costeer.speculative`` exists). Same
models, same prompts, same run.

    python bench/bench_e2e.py                      # SmolLM2-135M-Instruct in both roles
    python bench/bench_e2e.py --model tiny --max-new-tokens 8 --repeats 1   # seconds: CI's harness check

tokens/s = generated tokens / wall time of the whole generation (prefill included), best of
--repeats interleaved rounds (every other round in reverse order; the median of the rounds beside
it); the per-step breakdown (mean ms of a decode step: LLM wait, LLM
compute, transport, local small-model passes, steering, token choice) comes from the generator's
own timers. Peak memory: the client process's resident set sampled every 2 ms while a
configuration runs (peak, and the rise over the RSS before it), and the server's own peak (VmHWM).
The server runs in a subprocess on 127.0.0.1 and competes for the same CPU cores as the client.

Writes JSON, a Markdown table and PNG plots (tokens/s; per-step breakdown) under
bench/results/<machine>/ (or --out), and prints the table.
"""
from __future__ import annotations

import argparse
import os
import shlex
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

import torch  # noqa: E402

from bench.harness import Report, git_rev, machine_info  # noqa: E402
from costeer import Generator  # noqa: E402
from costeer.cli import CLI_DEFAULTS  # noqa: E402
from costeer.models import load_model, load_tokenizer  # noqa: E402
from costeer.reference_loop import reference_generate  # noqa: E402
from costeer_kernels import SteerConfig  # noqa: E402

CASES = [
    ("Suggest a weekend activity for me.", "I live in Zurich. I love hiking in the mountains and photography."),
    ("What should I cook for dinner tonight?", "I am vegan and allergic to peanuts. I like spicy Thai food."),
    ("Recommend a book for my next flight.", "I enjoy hard science fiction and I read Liu Cixin last month."),
    ("How should I train this week?", "I am preparing for my first marathon in October and my left knee hurts after long runs."),
    ("Which gift should I buy for my sister?", "My sister is twelve, plays the violin and collects minerals."),
    ("Plan my Saturday evening.", "I am an introvert, I live in Lisbon and I love jazz and small restaurants."),
    ("What laptop should I get?", "I am a video editor on a budget of 1500 euros and I travel a lot."),
    ("Suggest a hobby I could start.", "I work night shifts as a nurse and I have a small balcony."),
]
# The batch row runs these requests as ONE batch (all different: they share only the chat
# template's system prompt, so the prefill cannot skip a duplicate); the batch-1 rows run them one
# after another, so both rows decode the same requests. The vLLM rows use the first two.
VLLM_CASES = CASES[:2]
STEP_KEYS = ("llm_ms", "llm_compute_ms", "transport_ms", "local_ms", "steer_ms", "sample_ms", "total_ms")
COLUMNS = ["configuration", "tokens/s", "median tokens/s", "tokens", "seconds", "ms/step", "vs LLM alone",
           "median vs LLM alone", "vs reference loop", "rt/token",
           "steer share", "llm_ms",
           "llm_compute_ms",
           "transport_ms", "local_ms", "steer_ms", "sample_ms", "peak_rss_MB", "rss_rise_MB", "server_peak_MB"]


def tiny_model_dir(out: Path) -> str:
    """A 2-layer random Llama with SmolLM2's tokenizer (49152 tokens): the loop's real code paths in
    seconds, for testing the harness (its text is noise)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer("smollm2")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def _rss_mb(pid="self", key="VmRSS") -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


class PeakRSS:
    """Peak resident set of this process while the block runs (sampled every 2 ms)."""

    def __enter__(self):
        self.start = _rss_mb()
        self.peak = self.start
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_mb())


def start_server(model: str, threads):
    cmd = [sys.executable, "-m", "costeer", "serve", "--host", "127.0.0.1", "--port", "0", "--model", model]
    if threads:
        cmd += ["--threads", str(threads)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
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


def plots(report: Report, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report.rows
    labels = [r["configuration"] for r in rows]
    short = [lab.split(" (")[0] + ("\n(" + lab.split(" (", 1)[1] if " (" in lab else "") for lab in labels]
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.55 * len(rows)))
    ax.barh(range(len(rows)), [r["tokens/s"] for r in rows], color="tab:blue")
    ax.set_yticks(range(len(rows)), short, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("tokens/s (prefill included)")
    ax.set_title(f"end to end, {report.machine.get('gpu') or report.machine['cpu']}"[:80], fontsize=9)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "e2e_tokens_per_s.png", dpi=110)
    plt.close(fig)

    parts = ("llm_ms", "transport_ms", "local_ms", "steer_ms", "sample_ms")
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.55 * len(rows)))
    left = [0.0] * len(rows)
    for p in parts:
        vals = [r.get(p) if isinstance(r.get(p), float) else 0.0 for r in rows]
        ax.barh(range(len(rows)), vals, left=left, label=p.replace("_ms", ""))
        left = [a + b for a, b in zip(left, vals)]
    ax.set_yticks(range(len(rows)), short, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ms per decode step")
    ax.set_title("per-step breakdown (mean of the decode steps)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "e2e_step_breakdown.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="model in both roles; 'tiny' = a 2-layer random model (CI)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-server", action="store_true")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--speculative", type=int, default=4, help="draft length k of the speculative row (0: skip)")
    ap.add_argument("--batch", type=int, default=8, help="requests of the batched row (aggregate tokens/s; 0: skip)")
    ap.add_argument("--vllm", action="store_true",
                    help="add the rows through vLLM (scripts/vllm_cpu.py: its CPU build, the same model, loopback)")
    ap.add_argument("--pair", action="store_true",
                    help="add the cross-tokenizer rows: Gemma 3 270M as the LLM, the --model as the small model")
    ap.add_argument("--vllm-k", default="4,auto",
                    help="draft lengths of the speculative rows through vLLM, comma-separated ints or 'auto' (empty: none)")
    ap.add_argument("--vllm-cloud-k", default="4,8",
                    help="draft lengths of the speculative rows through vLLM whose drafts vLLM itself decodes "
                         "(Speculation(proposal='cloud')), comma-separated ints (empty: none)")
    ap.add_argument("--vllm-args", default="",
                    help="more vLLM server arguments, one string (e.g. '--block-size 128': the CPU build's default)")
    ap.add_argument("--vllm-score", default="prompts,prompt_logprobs",
                    help="scoring modes of the speculative rows through vLLM, comma-separated (OpenAICompletionsStream's score)")
    ap.add_argument("--out", type=Path, help="output folder (default bench/results/<machine>/)")
    ap.add_argument("--name", default="e2e", help="file stem of the report")
    args = ap.parse_args(argv)
    if args.max_new_tokens < 1 or args.repeats < 1:
        ap.error("--max-new-tokens and --repeats must be >= 1")
    from costeer.speculative import parse_k

    try:
        args.vllm_k = [parse_k(k) for k in args.vllm_k.split(",") if k.strip()]
    except ValueError as exc:
        ap.error(f"--vllm-k: {exc}")
    try:
        args.vllm_cloud_k = [parse_k(k) for k in args.vllm_cloud_k.split(",") if k.strip()]
    except ValueError as exc:
        ap.error(f"--vllm-cloud-k: {exc}")
    if "auto" in args.vllm_cloud_k:
        ap.error("--vllm-cloud-k: the cloud's drafts take ints only")
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info("cuda" if str(args.device).startswith("cuda") else "cpu")
    N = args.max_new_tokens
    cfg = SteerConfig(**CLI_DEFAULTS)
    tmp = None
    model_spec = args.model
    if args.model == "tiny":
        tmp = tempfile.TemporaryDirectory(prefix="costeer-tiny-")
        model_spec = tiny_model_dir(Path(tmp.name))
    model = load_model(model_spec, device=args.device)
    model_name = "2-layer random Llama (harness test)" if args.model == "tiny" else model.name

    def gen_fn(gen, mode="costeer"):
        def run():
            n, steps = 0, []
            for p, c in CASES:
                r = gen.generate(p, context=c, max_new_tokens=N, mode=mode)
                n += len(r.token_ids)
                steps.append(r.timing_summary())
            mean = {k: sum(s[k] for s in steps) / len(steps) for k in STEP_KEYS}
            return n, mean
        return run

    def batch_fn(gen, B, speculative=None):
        from costeer import Request

        reqs = [Request(prompt=CASES[i % len(CASES)][0], context=CASES[i % len(CASES)][1], max_new_tokens=N)
                for i in range(B)]

        def run():
            res = gen.generate(reqs, speculative=speculative)
            steps = res[0].timing_summary()
            if speculative:
                steps["rt/token"] = sum(r.llm_calls for r in res) / max(1, sum(r.decided for r in res))
            return sum(len(r.token_ids) for r in res), steps
        return run

    def ref_fn():
        n = 0
        for p, c in CASES:
            n += len(reference_generate(model, model, p, c, cfg=cfg, max_new_tokens=N))
        return n, None

    inproc = Generator(llm=model, slm=model, cfg=cfg)
    separate = Generator(llm=model, slm=model, cfg=cfg, cobatch=False)
    configs = [("LLM only (in process)", gen_fn(inproc, "llm"))]
    if not args.no_reference:
        configs.append(("reference loop (3 passes, eager T-step update)", ref_fn))
    k = args.speculative
    # Each speculative row right after the row it is compared with (rows late in a round, after the
    # Gemma model's, ran a few ms a step slower on the same code on a KVM guest). One model in both
    # roles, co-batched: speculation runs the co-batched step (no rounds); with a separate LLM stream
    # (cobatch=False) it drafts: compare that row with the separate-forward row.
    configs.append(("CoSteer in process (co-batched, 1 forward/step)", gen_fn(inproc)))
    if k > 0:
        configs.append((f"speculative CoSteer in process (k={k}; co-batched: the step, no rounds)",
                        _speculative_config(inproc, N, k)))
    configs.append(("CoSteer in process (separate LLM forward)", gen_fn(separate)))
    if k > 0:
        configs.append((f"speculative CoSteer in process (k={k}, separate LLM stream, drafting)",
                        _speculative_config(separate, N, k)))
    if args.batch > 1:
        configs.append((f"CoSteer in process, batch {args.batch} (co-batched, aggregate)", batch_fn(inproc, args.batch)))
        if k > 0:
            configs.append((f"speculative CoSteer in process, batch {args.batch} (k={k}, aggregate)",
                            batch_fn(inproc, args.batch, speculative=k)))
    if args.pair:
        gemma = load_model("gemma3-270m", device=args.device)
        pair = Generator(llm=gemma, slm=model, cfg=cfg)
        configs += [("Gemma 3 270M alone (in process)", gen_fn(pair, "llm")),
                    (f"CoSteer cross-tokenizer (Gemma 3 270M + {model.name})", gen_fn(pair))]
    proc = vllm_proc = None
    vllm_checks = {}
    remotes = []
    server_peak = float("nan")
    try:
        if not args.no_server:
            proc, url = start_server(model_spec, args.threads)
            for label, kw in (("full fp16", {}), ("top-20", {"response_format": "topk", "topk": 20})):
                remote = Generator(llm=None, slm=model, llm_url=url, cfg=cfg, **kw)
                remotes.append(remote)
                configs.append((f"CoSteer via costeer serve, loopback ({label})", gen_fn(remote)))
        vllm_labels = set()
        if args.vllm:
            vllm_proc, vllm_configs = _vllm_configs(model, cfg, N, args.vllm_k, gen_fn, vllm_checks,
                                                      [m for m in args.vllm_score.split(",") if m],
                                                      tuple(shlex.split(args.vllm_args)), args.vllm_cloud_k)
            configs += vllm_configs
            vllm_labels = {label for label, _ in vllm_configs}
        for label, fn in configs:  # warm-up (the reference loop excepted: it has no state to warm; vLLM's rows
            if not label.startswith("reference") and label not in vllm_labels:  # are warmed up by _vllm_configs)
                fn()
        best, rates = {}, {}
        for rnd in range(args.repeats):
            print(f"  round {rnd + 1}/{args.repeats}", file=sys.stderr, flush=True)
            # Every other round in reverse order: a row's place in a round is not its speed (on a
            # KVM guest whose speed drifts by up to 15% within minutes, rows measured later in a
            # round read slower), and each row then has an early and a late measurement.
            for label, fn in (configs if rnd % 2 == 0 else configs[::-1]):
                with PeakRSS() as mem:
                    t0 = time.perf_counter()
                    n, steps = fn()
                    dt = time.perf_counter() - t0
                prev = best.get(label)
                rates.setdefault(label, []).append(n / dt)
                peak, rise = mem.peak, mem.peak - mem.start
                if prev is not None:
                    peak, rise = max(peak, prev["peak_rss_MB"]), max(rise, prev["rss_rise_MB"])
                if prev is None or n / dt > prev["tokens/s"]:
                    best[label] = {"configuration": label, "tokens/s": n / dt, "tokens": n, "seconds": dt}
                    best[label].update({k: (steps.get(k, "") if steps else "") for k in STEP_KEYS + ("rt/token",)})
                best[label]["peak_rss_MB"], best[label]["rss_rise_MB"] = peak, rise
        if proc is not None:
            server_peak = _rss_mb(proc.pid, "VmHWM")
    finally:
        for r in remotes:
            r.close()
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=20)
        if vllm_proc is not None:
            _load_vllm_script().stop_server(vllm_proc)
        if tmp is not None:
            tmp.cleanup()
    rows = [best[label] for label, _ in configs]
    ref_row = next((r for r in rows if r["configuration"].startswith("reference")), None)
    alone = {"smol": rows[0], "gemma": next((r for r in rows if r["configuration"].startswith("Gemma")), None)}
    for r in rows:
        r["median tokens/s"] = statistics.median(rates[r["configuration"]])
        r["ms/step"] = r.pop("total_ms", "")
        base = alone["gemma"] if "Gemma" in r["configuration"] else alone["smol"]
        r["vs LLM alone"] = r["tokens/s"] / base["tokens/s"]
        r["median vs LLM alone"] = r["median tokens/s"] / base["median tokens/s"]
        r["vs reference loop"] = r["tokens/s"] / ref_row["tokens/s"] if ref_row and "Gemma" not in r["configuration"] else ""
        # The fused op's share of a decode step (the projection of the delta, steering, the token choice).
        r["steer share"] = r["steer_ms"] / r["ms/step"] if isinstance(r.get("steer_ms"), float) and r["ms/step"] else ""
        r["server_peak_MB"] = server_peak if "costeer serve" in r["configuration"] else ""
    try:
        info["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    cmd = "python bench/bench_e2e.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = Report(f"end to end ({model_name} in both roles, cfg {CLI_DEFAULTS}, {len(CASES)} prompts x {N} "
                    f"new tokens, best of {args.repeats} interleaved rounds, git {git_rev()})", info, cmd.strip(), rows)
    out_dir = report.write(args.name, COLUMNS, args.out, plots)
    print(report.markdown(COLUMNS))
    if args.vllm:
        summary = _vllm_summary(rows, vllm_checks)
        (out_dir / f"{args.name}_vllm_targets.md").write_text(summary + "\n")
        print(summary)
    print(f"wrote {out_dir}")
    return 0


def _load_vllm_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("vllm_cpu", ROOT / "scripts" / "vllm_cpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _pinned(fn, cores):
    """``fn`` run on ``cores`` only, with as many torch threads (then the previous placement again)."""
    def run():
        before, threads = os.sched_getaffinity(0), torch.get_num_threads()
        os.sched_setaffinity(0, cores)
        torch.set_num_threads(len(cores))
        try:
            return fn()
        finally:
            os.sched_setaffinity(0, before)
            torch.set_num_threads(threads)
    return run


def _vllm_configs(model, cfg, N, ks, gen_fn, checks, scores=("prompts", "prompt_logprobs"), server_args=(),
                  cloud_ks=()):
    """vLLM's CPU build on 127.0.0.1 (``scripts/vllm_cpu.py``) and the rows through it:

    * "vLLM decoding alone": one request per prompt, ``max_tokens=N``, greedy, the public prompt: the
      engine's own decoding speed (the speculative row's target);
    * "vLLM step rate": ``max_tokens=1`` requests with the growing prompt, no device work (the
      engine's own per-request step rate: the normal loop's bound);
    * CoSteer through vLLM (top-20, restrict), and speculative CoSteer through it, one row per draft
      length in ``ks`` (an int or "auto") and scoring mode in ``scores`` (``OpenAICompletionsStream``:
      "prompts", one prompt per drafted token on vLLM's prefix cache, or "prompt_logprobs");
    * speculative CoSteer whose drafts vLLM decodes itself (``Speculation(k, proposal="cloud")``),
      one row per draft length in ``cloud_ks``: one ``max_tokens=k+1`` request per round.

    llm_ms is the round trip per step (per round for the speculative rows), llm_compute_ms the engine's
    own time per request (``--enable-per-request-metrics``: queue + scheduled-to-first-token),
    transport_ms the difference.

    Cores: on a machine of its own vLLM would use all of them; here it shares them with this process,
    and two OpenMP runtimes that spin-wait on the same cores slow each other down many times over
    (measured on 2 cores: the normal loop's local passes took 1.6 s per step beside vLLM, 0.19 s
    with the cores split). So vLLM is bound to the last core (``VLLM_CPU_OMP_THREADS_BIND``) and the
    rows through it run this process on the other cores: the cloud and the device on separate
    hardware, as deployed. Every vLLM row, "alone" and "step rate" included, runs under that split.
    ``checks`` receives each speculative row's "same tokens as the normal
    loop" verdict. Every row re-sends the same prompts, so after the warm-up the normal loop's
    requests hit vLLM's prefix cache for their whole blocks (``--block-size 32``: scripts/vllm_cpu.py);
    ``prompt_logprobs`` requests never do.
    """
    import json
    import urllib.request

    from costeer.loop import build_prompts
    from costeer.llm import OpenAICompletionsStream
    from costeer.speculative import Speculation

    vc = _load_vllm_script()
    if not vc.venv_ready(vc.DEFAULT_VENV):
        raise SystemExit(f"--vllm: no vLLM environment at {vc.DEFAULT_VENV}: run python scripts/vllm_cpu.py setup")
    cores = sorted(os.sched_getaffinity(0))
    device_cores = set(cores[:-1]) or set(cores)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", str(cores[-1]))
    print(f"  starting vLLM on core {os.environ['VLLM_CPU_OMP_THREADS_BIND']} (about a minute); the device "
          f"side of its rows runs on {sorted(device_cores)}", file=sys.stderr, flush=True)
    proc, url = vc.start_server(venv=vc.DEFAULT_VENV, extra=server_args)
    tok = model.tokenizer
    pubs = [build_prompts(tok, tok, p, c)[0] for p, c in VLLM_CASES]
    V = len(tok)

    def alone():
        n = 0
        for pub in pubs:
            body = json.dumps({"model": "smollm2", "prompt": [pub], "max_tokens": N, "temperature": 0.0}).encode()
            req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=300) as r:
                n += json.loads(r.read())["usage"]["completion_tokens"]
        return n, None

    def step_rate():
        n, rts, server = 0, [], []
        for pub in pubs:
            s = OpenAICompletionsStream(url, model="smollm2", vocab_size=V, k=20)
            s.open([pub])
            for i in range(N):
                out = s.recv()
                rts.append(out.roundtrip_s)
                server.append(out.compute_s)
                n += 1
                if i < N - 1:
                    s.send([int(out.logits[0].argmax())])
            s.close()
        rt, sv = 1e3 * sum(rts) / len(rts), 1e3 * sum(server) / len(server)
        return n, {"llm_ms": rt, "llm_compute_ms": sv, "transport_ms": rt - sv, "total_ms": rt, "rt/token": 1.0}

    remote = Generator(llm=None, slm=model, llm_url=url, remote_model="smollm2", topk=20, cfg=cfg)
    normal_ids = {}

    def normal():
        n, steps = 0, []
        for p, c in VLLM_CASES:
            r = remote.generate(p, context=c, max_new_tokens=N)
            normal_ids[p] = r.token_ids
            n += len(r.token_ids)
            steps.append(r.timing_summary())
        mean = {key: sum(st[key] for st in steps) / len(steps) for key in STEP_KEYS}
        mean["rt/token"] = 1.0
        return n, mean

    configs = [("vLLM decoding alone (1 request, max_tokens=N)", alone),
               ("vLLM step rate (max_tokens=1 per token, growing prompt)", step_rate),
               ("CoSteer through vLLM (top-20, restrict)", normal)]

    def spec_row(k, score):
        cloud = score == "cloud drafts"
        label = f"speculative CoSteer through vLLM (k={k}, {score})"
        spec = Generator(llm=None, slm=model, llm_url=url, remote_model="smollm2", topk=20, cfg=cfg,
                         score="prompts" if cloud else score)
        if cloud:
            k = Speculation(k, proposal="cloud")

        def run():
            n, calls, decided, steps, same = 0, 0, 0, [], True
            for p, c in VLLM_CASES:
                r = spec.generate(p, context=c, max_new_tokens=N, speculative=k)
                n += len(r.token_ids)
                calls += r.llm_calls
                decided += r.decided
                steps.append(r.timing_summary())
                same = same and (p not in normal_ids or r.token_ids == normal_ids[p])
            checks[label] = same and len(normal_ids) == len(VLLM_CASES)
            mean = {key: sum(st.get(key, 0.0) for st in steps) / len(steps) for key in STEP_KEYS}
            mean["rt/token"] = calls / max(1, decided)
            return n, mean
        return label, run

    configs += [spec_row(k, score) for k in ks for score in scores]
    configs += [spec_row(k, "cloud drafts") for k in cloud_ks]
    configs = [(label, _pinned(fn, device_cores)) for label, fn in configs]
    # one short request per kind warms the engine up (its first request is seconds); the rows
    # themselves get no warm-up round, which would double the run's length
    for extra in ({}, {"prompt_logprobs": 20}):
        body = json.dumps({"model": "smollm2", "prompt": [pubs[0]], "max_tokens": 2, "temperature": 0.0,
                           "logprobs": 20, **extra}).encode()
        with urllib.request.urlopen(urllib.request.Request(url + "/v1/completions", body,
                                                           {"Content-Type": "application/json"}), timeout=300) as r:
            r.read()
    return proc, configs


def _vllm_summary(rows, checks) -> str:
    """The issue's targets for the rows through vLLM, from this run's numbers."""
    by = {r["configuration"]: r for r in rows}
    alone = by.get("vLLM decoding alone (1 request, max_tokens=N)")
    rate = by.get("vLLM step rate (max_tokens=1 per token, growing prompt)")
    normal = by.get("CoSteer through vLLM (top-20, restrict)")
    out = []
    if rate and normal:
        x = normal["tokens/s"] / rate["tokens/s"]
        out.append(f"- normal loop through vLLM / vLLM step rate: {x:.2f}x (target >= 0.8x: {'met' if x >= 0.8 else 'not met'})")
    for label, same in checks.items():
        r = by[label]
        x = r["tokens/s"] / alone["tokens/s"] if alone else float("nan")
        rt = r["rt/token"]
        out.append(f"- {label}: {x:.2f}x vLLM decoding alone (target >= 1.0x: {'met' if x >= 1.0 else 'not met'}), "
                   f"{rt:.3f} round trips/token (<= 0.35: {'met' if rt <= 0.35 else 'not met'}), "
                   f"tokens identical to the normal loop: {same}")
    return "\n".join(out)


def _speculative_config(gen, N, k):
    """A speculative row: the loop's speculative policy (``generate(speculative=k)``) on the normal
    row's own Generator and requests (a second Generator of the same settings only adds state;
    measured alternated, both step alike); ``rt/token`` is its cloud round trips per decided token
    (the normal loop: 1; the co-batched step: 0)."""

    def run():
        n, calls, decided, steps = 0, 0, 0, []
        for p, c in CASES:
            r = gen.generate(p, context=c, max_new_tokens=N, speculative=k)
            n += len(r.token_ids)
            calls += r.llm_calls
            decided += r.decided
            steps.append(r.timing_summary())
        mean = {key: sum(s.get(key, 0.0) for s in steps) / len(steps) for key in STEP_KEYS}
        mean["rt/token"] = calls / max(1, decided)
        return n, mean

    return run


if __name__ == "__main__":
    sys.exit(main())
