"""costeer eval: strict readers, retrieval, metrics, and the real CLI on 5 items (every artifact, resume)."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from costeer.eval import (DataError, GoldScorer, LikelihoodScorer, System, bootstrap_ci, derived_keywords,
                          keyword_hits, load_longlamp, project_set, read_items, read_longlamp_style, read_results,
                          read_simple, top_k_records)
from costeer.eval.runner import CONTEXT_TEMPLATE

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _write(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        for ln in lines:
            f.write((ln if isinstance(ln, str) else json.dumps(ln)) + "\n")
    return str(path)


# -- readers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, field, msg", [
    ({"context": "c"}, "prompt", "missing"),
    ({"context": "c", "prompt": 3}, "prompt", "must be a string"),
    ({"context": "c", "prompt": "p", "keywords": "vegan"}, "keywords", "list of non-empty strings"),
    ({"context": "c", "prompt": "p", "gold": ""}, "gold", "non-empty"),
    ({"context": "c", "prompt": "p", "promt": "x"}, "promt", "unknown field"),
    ({"prompt": "p"}, "context", "missing"),
])
def test_simple_reader_names_file_line_field(tmp_path, bad, field, msg):
    path = _write(tmp_path / "items.jsonl", [{"context": "ok", "prompt": "fine"}, "", bad])
    with pytest.raises(DataError) as e:
        read_simple(path)
    assert f"{path}:3: field {field!r}" in str(e.value) and msg in str(e.value)


def test_simple_reader_json_errors_and_duplicates(tmp_path):
    path = _write(tmp_path / "a.jsonl", [{"context": "", "prompt": "p"}, "{not json"])
    with pytest.raises(DataError, match=r"a\.jsonl:2: not valid JSON"):
        read_simple(path)
    path = _write(tmp_path / "b.jsonl", [[1, 2]])
    with pytest.raises(DataError, match=r"b\.jsonl:1: must be a JSON object"):
        read_simple(path)
    path = _write(tmp_path / "c.jsonl", [{"id": "x", "context": "", "prompt": "p"}, {"id": "x", "context": "", "prompt": "q"}])
    with pytest.raises(DataError, match=r"c\.jsonl:2: field 'id'.*repeats"):
        read_simple(path)
    items = read_simple(_write(tmp_path / "d.jsonl", [{"context": "I surf.", "prompt": "Plan my day.", "keywords": ["surf"]}]))
    assert items[0].id == "d.jsonl:1" and items[0].keywords == ["surf"] and items[0].gold is None


def test_longlamp_style_retrieves_relevant_records(tmp_path):
    profile = [{"summary": "Great espresso grinder", "reviewText": "Fine grind for espresso."},
               {"summary": "Tent", "reviewText": "The tent leaked on a hiking trip."},
               {"summary": "Headlamp", "reviewText": "Bright on night hikes in the hills, hiking every weekend."}]
    path = _write(tmp_path / "p.jsonl", [{"id": 7, "input": "Write a review of hiking boots.", "profile": profile,
                                          "output": "Good boots."}])
    (item,) = read_longlamp_style(path, k=2)
    assert item.id == "7" and item.gold == "Good boots." and item.prompt.startswith("Write a review")
    assert "hiking every weekend" in item.context and "leaked" in item.context and "espresso" not in item.context
    assert top_k_records("espresso grinder", [p["summary"] + " " + p["reviewText"] for p in profile], 1) == [0]
    assert read_items(path, k=1)[0].context.count("\n\n") == 0  # format told apart by the keys
    bad = _write(tmp_path / "q.jsonl", [{"input": "x", "profile": [{"id": 1}]}])
    with pytest.raises(DataError, match=r"q\.jsonl:1: field 'profile\[0\]': has no non-empty text field"):
        read_longlamp_style(bad)
    bad = _write(tmp_path / "r.jsonl", [{"input": "x", "profile": []}])
    with pytest.raises(DataError, match=r"r\.jsonl:1: field 'profile'"):
        read_longlamp_style(bad)


def test_public_longlamp_loader(tmp_path):
    # The public files' field names (LongLaMP/LongLaMP, product_review_user), extra fields included.
    d = tmp_path / "product_review_user"
    d.mkdir()
    rec = {"reviewerId": "A1", "overall": 4.0, "description": "Trail shoe", "summary": "Solid",
           "input": "Generate the review text written by a reviewer who has given an overall rating of 4.0 for a trail shoe",
           "output": "Grippy on rocks.",
           "profile": [{"overall": 5.0, "summary": "Light jacket", "reviewText": "Kept me dry on trail runs.",
                        "description": "Rain jacket", "asin": "B0"},
                       {"overall": 2.0, "summary": "Bad mug", "reviewText": "Leaks coffee.", "description": "Mug"}]}
    _write(d / "val.jsonl", [rec, dict(rec, output="Second.")])
    items = load_longlamp(str(tmp_path), "product_review", "val", k=1, limit=1)
    assert len(items) == 1 and items[0].kind == "product_review" and items[0].gold == "Grippy on rocks."
    assert "trail runs" in items[0].context and "overall: 5.0" in items[0].context and "Leaks" not in items[0].context
    (tmp_path / "topic_writing_user").mkdir()
    with open(tmp_path / "topic_writing_user" / "test.json", "w") as f:
        json.dump([{"input": "Write about travel", "output": "o", "profile": [{"summary": "s", "content": "Trains."}]}], f)
    assert load_longlamp(str(tmp_path), "topic_writing", "test")[0].context == "s\nTrains."
    with pytest.raises(DataError, match="abstract_generation_user"):
        load_longlamp(str(tmp_path), "abstract_generation")
    with pytest.raises(ValueError, match="task"):
        load_longlamp(str(tmp_path), "reviews")


def test_project_set_ships_with_gold_and_keywords():
    items = project_set()
    assert len(items) >= 60 and len({it.id for it in items}) == len(items)
    assert all(it.gold and it.keywords and it.context for it in items)
    assert len({it.persona for it in items}) >= 10 and len({it.kind for it in items}) >= 4


# -- metrics -----------------------------------------------------------------------------------


def test_keyword_and_gold_metrics():
    assert keyword_hits("I love Hiking and photos.", ["hik", "photo", "zurich"]) == pytest.approx(2 / 3)
    assert keyword_hits("unhiking", ["hik"]) == 0.0  # keywords start a word
    assert keyword_hits("x", []) != keyword_hits("x", [])  # NaN: nothing to hit
    kw = derived_keywords("I love surfing. Surfing in Bali, surfing daily; budget travel.", "Plan my travel.")
    assert kw[0] == "surfing" and "travel" not in kw and "love" not in kw
    g = GoldScorer()
    same = g("a spicy vegan curry", "a spicy vegan curry")
    assert same["rouge1"] == pytest.approx(1.0) and same["rougeL"] == pytest.approx(1.0) and same["chrf"] == pytest.approx(100.0)
    assert g("completely different words", "a spicy vegan curry")["rouge1"] == 0.0


def test_bootstrap_interval():
    mean, lo, hi, n = bootstrap_ci([0.0, 1.0] * 50)
    assert n == 100 and mean == pytest.approx(0.5) and lo < 0.5 < hi and hi - lo < 0.25
    assert bootstrap_ci([float("nan")])[3] == 0
    mean, lo, hi, n = bootstrap_ci([2.0, float("nan"), 2.0])
    assert (mean, lo, hi, n) == (2.0, 2.0, 2.0, 2)


def test_likelihood_ratio_rewards_context(smol):
    lik = LikelihoodScorer(smol, smol, CONTEXT_TEMPLATE)
    ctx = "My name is Zebulon and my cat is called Quasimodo."
    on = lik("Zebulon's cat Quasimodo", "Tell me about my pet.", ctx)
    off = lik("A dog in a park", "Tell me about my pet.", ctx)
    assert on["llr"] > off["llr"] and on["llr"] > 0.5 and on["ppl"] > 1.0 and on["answer_tokens"] > 3


def test_system_names():
    assert System.parse("costeer@T=3") == System("costeer@T=3", "costeer", 3)
    assert System.parse("llm").kind == "llm"
    assert System.parse("xtok-llm") == System("xtok-llm", "xtok-llm")
    assert System.parse("xtok-llm+ctx") == System("xtok-llm+ctx", "xtok-llm+ctx")
    from costeer.eval import default_systems

    assert default_systems([3], 3)[-3:] == ["xtok@T=3", "xtok-llm", "xtok-llm+ctx"]
    for bad in ("costeer", "costeer@T=x", "fast@T=3"):
        with pytest.raises(ValueError, match="system"):
            System.parse(bad)


def test_results_file_torn_line(tmp_path):
    p = tmp_path / "results.jsonl"
    p.write_text(json.dumps({"costeer_eval": 1, "key": "k", "config": {}}) + "\n" + json.dumps({"item": "a"}) + "\n{\"ite")
    header, recs = read_results(str(p), repair=True)
    assert recs == [{"item": "a"}] and p.read_text().endswith("}\n")
    p.write_text(json.dumps({"costeer_eval": 1}) + "\nbroken\n" + json.dumps({"item": "a"}) + "\n")
    with pytest.raises(Exception, match="damaged"):
        read_results(str(p))


# -- the real CLI: 5 items, few tokens, killed and resumed ------------------------------------

SYSTEMS = ["llm", "slm+ctx", "costeer@T=3"]


def _cli(out, *extra):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return [sys.executable, "-m", "costeer", "eval", "--limit", "5", "--max-new-tokens", "4", "--batch", "2",
            "--threads", "2", "--out", str(out), "--systems", *SYSTEMS, *extra], env


@pytest.mark.slow
def test_cli_smoke_every_artifact_and_resume(tmp_path, smol):  # smol: skips without the embedded model
    out = tmp_path / "run"
    cmd, env = _cli(out)
    results = out / "results.jsonl"
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:  # kill it once the first batch (2 items x 3 systems) is recorded
        while time.time() < deadline and proc.poll() is None:
            if results.exists() and len(results.read_text().splitlines()) >= 1 + 2 * len(SYSTEMS):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
    before = results.read_text()
    with open(results, "a") as f:
        f.write('{"item": "torn')  # as if killed in the middle of a write
    n_before = len(before.splitlines()) - 1
    assert n_before >= 2 * len(SYSTEMS) and n_before < 5 * len(SYSTEMS)
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--resume" in r.stderr  # never overwrites a run silently
    r = subprocess.run(cmd + ["--resume"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{n_before} results already there" in r.stderr
    after = results.read_text()
    assert after.startswith(before)  # finished pairs kept as they were, torn line gone
    header, recs = read_results(str(results))
    pairs = [(x["item"], x["system"]) for x in recs]
    assert len(pairs) == len(set(pairs)) == 5 * len(SYSTEMS)
    for x in recs:
        assert x["tokens"] <= 4 and 0 <= x["keywords"] <= 1 and x["ppl"] > 1 and x["seconds"] > 0
        assert 0 <= x["rouge1"] <= 1 and x["llr"] == x["llr"]
    # every artifact
    table = (out / "table.md").read_text()
    assert all(f"| {s} |" in table for s in SYSTEMS) and "keyword hits" in table and table in r.stdout
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["system"] for row in rows] == SYSTEMS and all(row["items"] == "5" for row in rows)
    assert float(rows[2]["c_T"]) == pytest.approx(0.9, abs=1e-3)
    summary = json.loads((out / "summary.json").read_text())
    assert [s["system"] for s in summary["systems"]] == SYSTEMS and summary["results"] == 15
    for name in ("quality_vs_T.png", "quality_vs_speed.png"):
        import matplotlib.image

        img = matplotlib.image.imread(out / name)
        assert img.shape[0] > 200 and img.shape[1] > 200
    # a finished run resumed again generates nothing and reports the same table
    r2 = subprocess.run(cmd + ["--resume", "--quiet", "--no-plots"], env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=300)
    assert r2.returncode == 0 and results.read_text() == after and (out / "table.md").read_text() == table


def test_resume_refuses_another_xtok_pair(tmp_path):
    # The results key leaves the cross-tokenizer pair out (xtok may be added on a resume); its
    # records carry the pair, and a resume with another pair must not merge the two.
    from costeer.eval import EvalError, evaluate
    from costeer.eval.runner import _config_key, run_config

    items = project_set()[:2]
    cfg = run_config(items, 4, "smollm2", "smollm2")
    rec = {"item": items[0].id, "system": "xtok@T=3", "pair": ["gemma3-270m", "smollm2"], "text": "x", "tokens": 1,
           "seconds": 1.0}
    _write(tmp_path / "results.jsonl", [{"costeer_eval": 1, "key": _config_key(items, cfg), "config": cfg}, rec])
    with pytest.raises(EvalError, match="was run with the pair gemma3-270m / smollm2"):
        evaluate(items, str(tmp_path), ["xtok@T=3"], max_new_tokens=4, xtok_pair=("other-llm", "smollm2"), resume=True,
                 progress=False, plots=False)


def test_cli_rejects_bad_threads(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "costeer", "eval", "--threads", "0", "--out", str(tmp_path / "o")],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--threads must be >= 1" in r.stderr


# -- the different-tokenizer pair's own baselines, on tiny random models (fast) --------------


def test_pair_baselines_run_score_report_and_resume(tmp_path, tiny_dir):
    # Main LLM = small model = tiny A; the pair is (tiny B, tiny A): xtok-llm must be B alone,
    # xtok-llm+ctx B given the context in its prompt, and ppl_pair B's perplexity (not A's).
    import torch

    from costeer.eval import EvalError, evaluate
    from costeer.eval.metrics import Perplexity
    from costeer.loop import chat_ids
    from costeer.models import load_model
    from tests.costeer.tiny import make_tiny_model

    b_dir = make_tiny_model(str(tmp_path / "tiny_b"), seed=1)
    pair = (b_dir, tiny_dir)
    items = project_set()[:2]
    out = tmp_path / "run"
    systems = ["llm", "xtok@T=3", "xtok-llm", "xtok-llm+ctx"]
    kw = dict(max_new_tokens=3, llm=tiny_dir, slm=tiny_dir, batch=2, progress=False, plots=False)
    summary = evaluate(items, str(out), systems, xtok_pair=pair, **kw)
    header, recs = read_results(str(out / "results.jsonl"))
    assert sorted((r["item"], r["system"]) for r in recs) == sorted((it.id, s) for it in items for s in systems)
    b = load_model(b_dir)
    ppl_b = Perplexity(b)
    by = {(r["item"], r["system"]): r for r in recs}
    for it in items:
        for name, prompt in (("xtok-llm", it.prompt), ("xtok-llm+ctx", CONTEXT_TEMPLATE.format(context=it.context,
                                                                                              prompt=it.prompt))):
            ids = chat_ids(b.tokenizer, prompt)
            with torch.no_grad():  # B's own greedy continuation of the plain prompt
                ref = b.model.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False)[0, len(ids):]
            r = by[(it.id, name)]
            assert r["text"] == b.tokenizer.decode(ref, skip_special_tokens=True) and r["tokens"] == 3
        for name in ("xtok@T=3", "xtok-llm", "xtok-llm+ctx"):
            r = by[(it.id, name)]
            assert r["pair"] == list(pair) and r["llr"] == r["llr"] and 0 <= r["keywords"] <= 1
            assert r["ppl_pair"] == pytest.approx(ppl_b(r["text"], it.prompt)) and r["ppl_pair"] != r["ppl"]
        assert "ppl_pair" not in by[(it.id, "llm")] and "pair" not in by[(it.id, "llm")]
    # every artifact has the new systems; ppl_pair only for the pair's
    assert [row["system"] for row in summary["systems"]] == systems and summary["pairs"] == [" / ".join(pair)]
    table = (out / "table.md").read_text()
    assert all(f"| {s} |" in table for s in systems) and "perplexity (pair's LLM, no context)" in table
    with open(out / "results.csv") as f:
        rows = {row["system"]: row for row in csv.DictReader(f)}
    assert rows["llm"]["ppl_pair_n"] == "0" and all(rows[s]["ppl_pair_n"] == "2" for s in systems[1:])
    # a resume with another pair is refused, even for the baselines alone (they would be compared
    # with the other pair's xtok in one table)
    with pytest.raises(EvalError, match="was run with the pair"):
        evaluate(items, str(out), ["xtok-llm"], xtok_pair=(tiny_dir, tiny_dir), resume=True, **kw)
    # records written before ppl_pair existed get it from their text on a resume; nothing else changes
    path = out / "results.jsonl"
    full = path.read_text()
    lines = full.splitlines(keepends=True)
    old = [lines[0]] + [json.dumps({k: v for k, v in json.loads(ln).items() if k != "ppl_pair"}) + "\n"
                        for ln in lines[1:]]
    path.write_text("".join(old))
    evaluate(items, str(out), systems, xtok_pair=pair, resume=True, **kw)
    new = [json.loads(ln) for ln in path.read_text().splitlines()]
    assert len(new) == len(lines) and new[0] == header
    for r, r0 in zip(new[1:], (json.loads(ln) for ln in lines[1:])):
        assert r.keys() == r0.keys() and r["text"] == r0["text"]
        if "ppl_pair" in r:
            assert r["ppl_pair"] == pytest.approx(r0["ppl_pair"])
    evaluate(items, str(out), systems, xtok_pair=pair, resume=True, **kw)  # finished: nothing is rewritten
    assert [json.loads(ln) for ln in path.read_text().splitlines()] == new


def test_pair_baselines_skipped_without_a_pair(tmp_path, tiny_dir):
    from costeer.eval import evaluate

    summary = evaluate(project_set()[:1], str(tmp_path), ["llm", "xtok-llm", "xtok-llm+ctx"], max_new_tokens=2,
                       llm=tiny_dir, slm=tiny_dir, progress=False, plots=False)
    assert [row["system"] for row in summary["systems"]] == ["llm"]
    assert set(summary["skipped"]) == {"xtok-llm", "xtok-llm+ctx"} and "--xtok-pair" in summary["skipped"]["xtok-llm"]
