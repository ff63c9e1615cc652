"""Run systems over evaluation items, resumably, and write the report (table, CSV, JSON, plots).

Results go to ``OUT/results.jsonl``: a header line ``{"costeer_eval": 1, "config": {...}}``, then one
line per (item, system) as soon as it is scored. A run that is killed continues with ``resume=True``:
the finished pairs are kept, a torn last line is dropped, the rest is generated. Items are run in
order, every system on an item before the next item, so a partial run still compares all systems on
the same items.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

from .data import EvalItem
from .metrics import GoldScorer, LikelihoodScorer, Perplexity, bootstrap_ci, derived_keywords, keyword_hits

CONTEXT_TEMPLATE = "Here is some information about me:\n{context}\n\n{prompt}"
BASELINES = ("llm", "slm+ctx", "llm+ctx")
# The different-tokenizer pair's own baselines: its LLM alone and its LLM given the context (the
# pair's non-private upper bound), so that xtok is compared with the LLM it steers.
PAIR_BASELINES = ("xtok-llm", "xtok-llm+ctx")
KINDS = ("costeer", "gate", "spec", "topk-restrict", "topk-floor", "xtok")
PAIR_KINDS = ("xtok",) + PAIR_BASELINES  # systems that run on --xtok-pair; their records carry the pair
TITLES = {"llm": "LLM alone (public prompt)", "slm+ctx": "small model + context",
          "llm+ctx": "LLM + context (not private; upper bound)", "costeer": "CoSteer",
          "gate": "CoSteer + confidence gate (0.9, patience 3)", "spec": "CoSteer, speculative (k=4)",
          "topk-restrict": "CoSteer, top-20 transport, restrict", "topk-floor": "CoSteer, top-20 transport, floor",
          "xtok": "CoSteer, different-tokenizer pair", "xtok-llm": "pair's LLM alone (public prompt)",
          "xtok-llm+ctx": "pair's LLM + context (not private; the pair's upper bound)"}
# ppl_pair: perplexity under the pair's LLM without the context, for the pair's systems only (the
# fluency measure of ppl with the LLM that xtok actually steers; NaN for the other systems).
METRICS = ("keywords", "llr", "rouge1", "rougeL", "chrf", "ppl", "ppl_pair")
_SYSTEM = re.compile(r"^(?P<kind>[a-z-]+)@T=(?P<T>\d+)$")


@dataclass(frozen=True)
class System:
    """``llm``, ``slm+ctx``, ``llm+ctx``, ``xtok-llm``, ``xtok-llm+ctx``, or ``KIND@T=N`` with KIND in
    :data:`KINDS`."""

    name: str
    kind: str
    T: Optional[int] = None

    @classmethod
    def parse(cls, name: str) -> "System":
        if not isinstance(name, str):
            raise TypeError(f"system must be a string, got {type(name).__name__}")
        if name in BASELINES + PAIR_BASELINES:
            return cls(name, name)
        m = _SYSTEM.match(name)
        if not m or m["kind"] not in KINDS:
            raise ValueError(f"system {name!r}: expected one of {', '.join(BASELINES + PAIR_BASELINES)} or KIND@T=N "
                             f"with KIND in "
                             f"{', '.join(KINDS)} (e.g. costeer@T=3)")
        return cls(name, m["kind"], int(m["T"]))


def default_systems(T_sweep: Sequence[int], T_default: int) -> List[str]:
    """The baselines, CoSteer over the sweep, then gate / speculative / top-k / cross-tokenizer at the
    default, and the cross-tokenizer pair's own baselines (skipped, like xtok, without a pair)."""
    return (list(BASELINES) + [f"costeer@T={T}" for T in T_sweep]
            + [f"{k}@T={T_default}" for k in ("gate", "spec", "topk-restrict", "topk-floor", "xtok")]
            + list(PAIR_BASELINES))


class EvalError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# Results file


def run_config(items: Sequence[EvalItem], max_new_tokens: int, llm: str, slm: str) -> Dict:
    """The settings a results file is keyed by (with the items' text)."""
    return {"max_new_tokens": max_new_tokens, "llm": llm, "slm": slm, "template": CONTEXT_TEMPLATE,
            "decoding": "greedy", "items": [it.id for it in items]}


def _config_key(items: Sequence[EvalItem], cfg: Dict) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it.id, it.prompt, it.context, it.gold, it.keywords]).encode("utf-8"))
    h.update(json.dumps(cfg, sort_keys=True).encode("utf-8"))
    return h.hexdigest()


def read_results(path: str, repair: bool = False):
    """(header, records) of a results file; ``repair`` cuts a torn last line off the file."""
    with open(path, "rb") as f:
        raw = f.read()
    header, recs, good = None, [], 0
    lines = raw.splitlines(keepends=True)
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        try:
            if not line.endswith(b"\n"):
                raise ValueError("no newline")
            rec = json.loads(line)
        except ValueError:
            if last:  # the process died while writing this line
                break
            raise EvalError(f"{path}:{i + 1}: not a results line (the file is damaged; start a new run)") from None
        if header is None:
            if not isinstance(rec, dict) or rec.get("costeer_eval") != 1:
                raise EvalError(f"{path}:1: not a costeer eval results file")
            header = rec
        else:
            recs.append(rec)
        good += len(line)
    if header is None:
        raise EvalError(f"{path}: no header line")
    if repair and good < len(raw):
        with open(path, "r+b") as f:
            f.truncate(good)
    return header, recs


# ---------------------------------------------------------------------------------------------
# Generation per system


class _TopkServer:
    """A real ``costeer serve`` on 127.0.0.1 (free port) for the top-k transport systems."""

    def __init__(self, model: str, timeout: float = 300.0):
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, "-m", "costeer", "serve", "--host", "127.0.0.1", "--port", "0",
                                      "--model", model, "--threads", "1"], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, env=env)
        deadline = time.time() + timeout
        self.url = None
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            m = re.search(r"listening on (ws://\S+)", line)
            if m:
                self.url = m.group(1)
                break
        if self.url is None:
            self.close()
            raise EvalError("costeer serve did not start (needed for the top-k transport systems)")

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class _Systems:
    """Builds and caches one generator per system; ``run(system, item)`` -> (text, tokens, seconds)."""

    def __init__(self, llm: str, slm: str, xtok: Optional[Sequence[str]], device: str, say: Callable[[str], None]):
        from ..models import load_model

        self.llm_name, self.slm_name, self.device, self.say = llm, slm, device, say
        self.slm = load_model(slm, device=device)
        self.llm = self.slm if llm == slm else load_model(llm, device=device)
        self.xtok = xtok
        self._pair = None  # (LLM, small model) of --xtok-pair, loaded on first use
        self._gens: Dict[str, object] = {}
        self._server: Optional[_TopkServer] = None
        self.skipped: Dict[str, str] = {}

    def _generator(self, s: System):
        from .. import Generator
        from costeer_kernels import SteerConfig

        if s.name in self._gens:
            return self._gens[s.name]
        cfg = SteerConfig(T=s.T) if s.T is not None else None
        kw = dict(cfg=cfg, context_template=CONTEXT_TEMPLATE, device=self.device)
        if s.kind == "gate":
            from ..gating import ConfidenceGate

            gen = Generator(llm=self.llm, slm=self.slm, gate=ConfidenceGate(threshold=0.9, patience=3), **kw)
        elif s.kind in ("topk-restrict", "topk-floor"):
            if self._server is None:
                self.say(f"starting costeer serve ({self.llm_name}) on 127.0.0.1 for the top-k transport ...")
                self._server = _TopkServer(self.llm_name)
            gen = Generator(llm=None, slm=self.slm, llm_url=self._server.url, response_format="topk", topk=20,
                            topk_policy=s.kind.split("-")[1], **kw)
        elif s.kind in PAIR_KINDS:
            xl, xs = self.pair()
            key = "pair" if s.kind in PAIR_BASELINES else s.name  # the two baselines share one Generator
            if key not in self._gens:
                try:
                    self._gens[key] = Generator(llm=xl, slm=xs, **kw)
                except (ValueError, TypeError) as exc:
                    raise _Skip(f"different-tokenizer pair {self.xtok[0]} / {self.xtok[1]} refused: {exc}") from None
            gen = self._gens[key]
        else:
            gen = Generator(llm=self.llm, slm=self.slm, **kw)
        self._gens[s.name] = gen
        return gen

    def pair(self):
        """The loaded (LLM, small model) of the different-tokenizer pair; raises _Skip without one."""
        if self._pair is None:
            if not self.xtok:
                raise _Skip("no different-tokenizer pair given (--xtok-pair LLM SLM, both installed locally)")
            from ..models import ModelNotFoundError, load_model

            try:
                self._pair = tuple(load_model(m, device=self.device) for m in self.xtok)
            except (ModelNotFoundError, ValueError, TypeError) as exc:
                raise _Skip(f"different-tokenizer pair {self.xtok[0]} / {self.xtok[1]} unavailable: {exc}") from None
        return self._pair

    def run(self, s: System, items: Sequence[EvalItem], max_new_tokens: int):
        """Generate for the items as one batch; (text, tokens) per item and the batch's wall seconds."""
        if s.name in self.skipped:
            raise _Skip(self.skipped[s.name])
        try:
            gen = self._generator(s)
        except _Skip as exc:
            self.skipped[s.name] = str(exc)
            raise
        kw = dict(max_new_tokens=max_new_tokens, temperature=0.0)
        t0 = time.perf_counter()
        if s.kind == "spec":  # the loop's speculative policy, k = 4
            res = gen.generate([{"prompt": it.prompt, "context": it.context} for it in items], speculative=4, **kw)
        elif s.kind in ("llm", "xtok-llm"):
            res = gen.generate([{"prompt": it.prompt} for it in items], mode="llm", **kw)
        elif s.kind in ("llm+ctx", "xtok-llm+ctx"):  # a base LLM without a chat template reads it as plain text
            res = gen.generate([{"prompt": CONTEXT_TEMPLATE.format(context=it.context, prompt=it.prompt)}
                                for it in items], mode="llm", **kw)
        else:
            res = gen.generate([{"prompt": it.prompt, "context": it.context} for it in items],
                               mode="slm" if s.kind == "slm+ctx" else "costeer", **kw)
        return [(r.text, len(r.token_ids)) for r in res], time.perf_counter() - t0

    def close(self):
        if self._server is not None:
            self._server.close()
            self._server = None


class _Skip(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# The run


def evaluate(items: Sequence[EvalItem], out_dir: str, systems: Sequence[str], *, max_new_tokens: int = 32,
             llm: str = "smollm2", slm: str = "smollm2", xtok_pair: Optional[Sequence[str]] = None,
             device: str = "cpu", batch: int = 8, resume: bool = False, progress: bool = True, plots: bool = True,
             say: Optional[Callable[[str], None]] = None) -> Dict:
    """Generate with every system on every item, score, and write the report into ``out_dir``.

    ``batch`` items are decoded together (one batched forward per step; speculative steering one
    at a time); their results are written once every system has run on them, and each record's
    ``seconds`` is the batch's wall time over its size (throughput, not single-request latency).
    Returns the summary (also ``out_dir/summary.json``). ``resume=True`` continues the run recorded
    in ``out_dir/results.jsonl`` (same items and settings; systems may be added)."""
    say = say or (lambda m: None)
    if not items:
        raise ValueError("items must be a non-empty list of EvalItem")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= 16:
        raise ValueError(f"batch must be an int in [1, 16], got {batch!r}")
    parsed = [System.parse(s) for s in systems]
    if not parsed:
        raise ValueError("systems must name at least one system")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "results.jsonl")
    cfg = run_config(items, max_new_tokens, llm, slm)
    key = _config_key(items, cfg)
    done = set()
    if os.path.exists(path):
        if not resume:
            raise EvalError(f"{path} exists: continue it with --resume, or choose another --out")
        header, recs = read_results(path, repair=True)
        if header.get("key") != key:
            raise EvalError(f"{path} was written for other items or settings (max_new_tokens, models); "
                            f"give the same ones, or choose another --out")
        # The key cannot hold the cross-tokenizer pair (its systems may be added on a resume), so
        # their records carry the pair: results of two pairs must not be merged under one name,
        # nor a pair's baselines compared with another pair's xtok in one run.
        pair = list(xtok_pair) if xtok_pair else None
        if pair and any(s.kind in PAIR_KINDS for s in parsed):
            for r in recs:
                if "pair" in r and r["pair"] != pair:
                    raise EvalError(f"{path}: {r['system']} was run with the pair {' / '.join(r['pair'])}, not "
                                    f"{' / '.join(pair)}: give --xtok-pair {' '.join(r['pair'])}, or choose another "
                                    f"--out")
        done = {(r["item"], r["system"]) for r in recs}
        say(f"resuming {path}: {len(done)} results already there")
        # Records of the pair's systems written before ppl_pair existed get it from their text.
        backfill = [r for r in recs if pair and "ppl_pair" not in r and r["system"] in {s.name for s in parsed}
                    and System.parse(r["system"]).kind in PAIR_KINDS]
    else:
        backfill = []
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps({"costeer_eval": 1, "key": key, "config": cfg}) + "\n")
    todo = [it for it in items if any((it.id, s.name) not in done for s in parsed)]
    runner = gold = lik = None
    pair_ppl: Optional[Perplexity] = None
    fh = None
    try:
        if todo or backfill:
            say(f"loading {slm} (small model) and {llm} (LLM) ...")
            runner = _Systems(llm, slm, xtok_pair, device, say)
            gold = GoldScorer()
            lik = LikelihoodScorer(runner.llm, runner.slm, CONTEXT_TEMPLATE)
            if xtok_pair and any(s.kind in PAIR_KINDS for s in parsed):
                try:
                    pair_ppl = Perplexity(runner.pair()[0])
                except _Skip as exc:  # the pair's systems are then skipped with this note
                    runner.skipped.update({s.name: str(exc) for s in parsed if s.kind in PAIR_KINDS})
        if backfill and pair_ppl is not None:
            _backfill_ppl_pair(path, backfill, {it.id: it for it in items}, pair_ppl, say)
        fh = open(path, "a", encoding="utf-8")
        from tqdm import tqdm

        bar = tqdm(total=len(items), initial=len(items) - len(todo), desc="costeer eval", unit="item",
                   disable=not progress, file=sys.stderr)
        for start in range(0, len(todo), batch):
            chunk = todo[start:start + batch]
            recs: Dict[str, List[Dict]] = {it.id: [] for it in chunk}
            for s in parsed:
                pending = [it for it in chunk if (it.id, s.name) not in done]
                if not pending:
                    continue
                try:
                    outs, wall = runner.run(s, pending, max_new_tokens)
                except _Skip:
                    continue
                for it, (text, ntok) in zip(pending, outs):
                    kws = it.keywords or derived_keywords(it.context, it.prompt)
                    rec = {"item": it.id, "system": s.name, "kind": it.kind, "persona": it.persona, "text": text,
                           "tokens": ntok, "seconds": wall / len(pending), "batch": len(pending),
                           "keywords": keyword_hits(text, kws), "keyword_source": "item" if it.keywords else "derived"}
                    if s.kind in PAIR_KINDS:
                        rec["pair"] = list(xtok_pair)
                    rec.update(gold(text, it.gold))
                    rec.update(lik(text, it.prompt, it.context))
                    if s.kind in PAIR_KINDS:
                        rec["ppl_pair"] = pair_ppl(text, it.prompt)
                    recs[it.id].append(rec)
            for it in chunk:  # item by item, once every system has run on the chunk
                for rec in recs[it.id]:
                    fh.write(json.dumps(rec) + "\n")
                fh.flush()
                bar.update(1)
        bar.close()
    finally:
        if fh is not None:
            fh.close()
        if runner is not None:
            runner.close()
    skipped = dict(runner.skipped) if runner is not None else {}
    for name, why in skipped.items():
        say(f"skipped {name}: {why}")
    return write_report(out_dir, [s.name for s in parsed], skipped=skipped, plots=plots)


def _backfill_ppl_pair(path: str, recs: Sequence[Dict], items: Dict[str, EvalItem], pair_ppl: "Perplexity",
                       say: Callable[[str], None]):
    """Add ``ppl_pair`` (computed from the stored text) to the given records of ``path``; the file is
    rewritten to a temporary file and renamed over the old one, so a kill leaves either version."""
    keys = {(r["item"], r["system"]) for r in recs}
    header, all_recs = read_results(path)
    missing = [r for r in all_recs if "ppl_pair" not in r and (r["item"], r["system"]) in keys]
    say(f"adding ppl_pair (the pair's LLM) to {len(missing)} earlier records of the pair's systems ...")
    for r in missing:
        it = items.get(r["item"])
        r["ppl_pair"] = pair_ppl(r["text"], it.prompt) if it is not None else float("nan")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(header) + "\n")
        for r in all_recs:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Report


def _c_T(T: Optional[int]) -> Optional[float]:
    if T is None:
        return None
    from costeer_kernels import steer_coefficient

    return float(steer_coefficient(T, 2.0, 1.0, 2.0, 10.0))


def summarize(records: Sequence[Dict], systems: Sequence[str]) -> List[Dict]:
    """One row per system with results: mean and 95% bootstrap interval of every metric, tokens/s."""
    rows = []
    for name in systems:
        rs = [r for r in records if r["system"] == name]
        if not rs:
            continue
        s = System.parse(name)
        row = {"system": name, "title": TITLES[s.kind], "T": s.T, "c_T": _c_T(s.T), "items": len(rs)}
        for m in METRICS:
            vals = [r.get(m, float("nan")) for r in rs]  # ppl_pair: only the pair's systems have it
            if m in ("ppl", "ppl_pair"):  # over items: exp of the mean per-token NLL (one outlier cannot dominate)
                mean, lo, hi, n = bootstrap_ci([math.log(v) if v == v else float("nan") for v in vals])
                mean, lo, hi = (math.exp(v) if v == v else v for v in (mean, lo, hi))
            else:
                mean, lo, hi, n = bootstrap_ci(vals)
            row[m], row[m + "_lo"], row[m + "_hi"], row[m + "_n"] = mean, lo, hi, n
        toks, secs = sum(r["tokens"] for r in rs), sum(r["seconds"] for r in rs)
        row["tokens_per_s"] = toks / secs if secs > 0 else float("nan")
        row["mean_tokens"] = toks / len(rs)
        rows.append(row)
    return rows


def _fmt(v, digits):
    return "-" if v is None or v != v else f"{v:.{digits}f}"


def markdown_table(rows: Sequence[Dict]) -> str:
    head = ("| system | c_T | items | keyword hits | LLR (nats/token) | ROUGE-1 | ROUGE-L | chrF | "
            "perplexity (LLM, no context) | perplexity (pair's LLM, no context) | tokens/s |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        def ci(m, d):
            if r[m + "_n"] == 0:
                return "-"
            return f"{_fmt(r[m], d)} [{_fmt(r[m + '_lo'], d)}, {_fmt(r[m + '_hi'], d)}]"
        out.append(f"| {r['system']} | {_fmt(r['c_T'], 3)} | {r['items']} | {ci('keywords', 3)} | {ci('llr', 3)} | "
                   f"{ci('rouge1', 3)} | {ci('rougeL', 3)} | {ci('chrf', 1)} | {ci('ppl', 2)} | {ci('ppl_pair', 2)} | "
                   f"{_fmt(r['tokens_per_s'], 1)} |")
    return "\n".join(out)


def write_report(out_dir: str, systems: Optional[Sequence[str]] = None, *, skipped: Optional[Dict[str, str]] = None,
                 plots: bool = True) -> Dict:
    """table.md, results.csv, summary.json and (with ``plots``) quality_vs_T.png and
    quality_vs_speed.png from ``out_dir/results.jsonl``."""
    header, recs = read_results(os.path.join(out_dir, "results.jsonl"))
    if systems is None:
        systems = list(dict.fromkeys(r["system"] for r in recs))
    rows = summarize(recs, systems)
    notes = [f"{name}: skipped ({why})" for name, why in (skipped or {}).items()]
    table = markdown_table(rows)
    cfg = header["config"]
    pairs = sorted({" / ".join(r["pair"]) for r in recs if "pair" in r and r["system"] in systems})
    with open(os.path.join(out_dir, "table.md"), "w", encoding="utf-8") as f:
        f.write(f"LLM {cfg['llm']}, small model {cfg['slm']}, greedy, {cfg['max_new_tokens']} new tokens, "
                f"{len(cfg['items'])} items; mean [95% bootstrap interval over items]\n")
        if pairs:
            f.write(f"Different-tokenizer pair (xtok systems; LLM / small model): {', '.join(pairs)}. LLR and "
                    f"perplexity (LLM) are scored by {cfg['slm']} / {cfg['llm']} for every system; perplexity "
                    f"(pair's LLM) by the pair's LLM, for the pair's systems only.\n")
        f.write(f"\n{table}\n")
        for n in notes:
            f.write(f"\n* {n}")
        f.write("\n")
    cols = ["system", "title", "T", "c_T", "items", "tokens_per_s", "mean_tokens"] + \
        [m + sfx for m in METRICS for sfx in ("", "_lo", "_hi", "_n")]
    with open(os.path.join(out_dir, "results.csv"), "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    summary = {"config": cfg, "pairs": pairs, "systems": rows, "skipped": skipped or {}, "results": len(recs)}
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1, allow_nan=True)
    if plots and rows:
        _plots(out_dir, rows)
    return summary


def _plots(out_dir: str, rows: Sequence[Dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = sorted((r for r in rows if r["system"].startswith("costeer@")), key=lambda r: r["T"])
    base = {r["system"]: r for r in rows if r["system"] in BASELINES}
    panels = [("keywords", "keyword hit rate"), ("llr", "LLR (nats/token)"), ("rougeL", "ROUGE-L F1"),
              ("ppl", "perplexity (LLM, no context)")]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (m, label) in zip(axes.flat, panels):
        if sweep:
            x = [r["T"] for r in sweep]
            y = [r[m] for r in sweep]
            err = [[r[m] - r[m + "_lo"] for r in sweep], [r[m + "_hi"] - r[m] for r in sweep]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label="CoSteer")
        for name, style in (("llm", "--"), ("slm+ctx", ":"), ("llm+ctx", "-.")):
            if name in base and base[name][m] == base[name][m]:
                ax.axhline(base[name][m], linestyle=style, color="gray", label=name)
        ax.set_xlabel("T (steering iterations)")
        ax.set_ylabel(label)
        if m == "ppl":
            ax.set_yscale("log")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Quality vs steering strength T (mean, 95% bootstrap interval)")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "quality_vs_T.png"), dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, (m, label) in zip(axes, panels[:2]):
        for r in rows:
            ax.errorbar(r["tokens_per_s"], r[m], yerr=[[r[m] - r[m + "_lo"]], [r[m + "_hi"] - r[m]]], marker="o",
                        capsize=3)
            ax.annotate(r["system"], (r["tokens_per_s"], r[m]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("tokens/s (this machine)")
        ax.set_ylabel(label)
    fig.suptitle("Quality vs speed")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "quality_vs_speed.png"), dpi=110)
    plt.close(fig)
