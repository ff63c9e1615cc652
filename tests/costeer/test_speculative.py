"""Speculative steering, a policy of the one loop (``Generator.generate(speculative=K)``): greedy output
identical to the normal loop on the real SmolLM2 model (batch > 1, gate, stop strings, streaming,
resume), sampled output reproducible from the seed and distributed as the steered distribution
(chi-square against float64 enumeration), verification op exact, rollback equal to a fresh prefill."""
import math

import pytest
import torch

from costeer import Generator, Request
from costeer.cli import CLI_DEFAULTS
from costeer.models import LoadedModel
from costeer.kv import KVBatch
from costeer.speculative import AdaptiveK, Speculation
from costeer_kernels import SteerConfig, steer, steer_sample
from costeer_kernels.verify import speculative_verify

CASES = [
    ("Suggest a weekend activity.", "I love hiking in the mountains and I live in Zurich."),
    ("What should I cook tonight?", "I am vegan and allergic to peanuts."),
    ("Recommend a book for me.", "My favourite genre is science fiction; I enjoyed Dune."),
]
N = 20


def chi2_critical(df: int, z: float = 3.719) -> float:
    """Upper quantile of chi-square(df) (Wilson-Hilferty), z = 3.719: p = 1e-4."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def chi2(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0):
    """(statistic, degrees of freedom), cells with a small expectation pooled into one."""
    n = float(counts.sum())
    exp = probs.double().flatten() * n
    obs = counts.double().flatten()
    big = exp >= min_expected
    e = torch.cat([exp[big], exp[~big].sum()[None]])
    o = torch.cat([obs[big], obs[~big].sum()[None]])
    keep = e > 0
    assert float(o[~keep].sum()) == 0.0, "a sample fell on a zero-probability outcome"
    stat = float(((o[keep] - e[keep]) ** 2 / e[keep]).sum())
    return stat, int(keep.sum()) - 1


# ---------------------------------------------------------------------------------------------
# greedy: token-for-token the normal loop, real SmolLM2


@pytest.fixture(scope="module")
def gen(smol):
    # cobatch=False: the LLM keeps a stream of its own, so speculation drafts (one model in both roles
    # co-batched runs the co-batched step instead: test_one_model_cobatched_runs_the_step).
    return Generator(llm=smol, slm=smol, cfg=SteerConfig(**CLI_DEFAULTS), cobatch=False)


@pytest.fixture(scope="module")
def baselines(gen):
    return {p: gen.generate(p, context=c, max_new_tokens=N) for p, c in CASES}


@pytest.mark.parametrize("prompt,context", CASES)
def test_greedy_identical_to_normal_loop(gen, baselines, prompt, context):
    ref = baselines[prompt]
    for k in (1, 2, 4, 8):
        res = gen.generate(prompt, context=context, max_new_tokens=N, speculative=k)
        assert res.token_ids == ref.token_ids, k
        assert res.text == ref.text and res.finish_reason == ref.finish_reason
        assert res.decided == len(ref.token_ids) + (ref.finish_reason == "eos")
        assert res.llm_calls == res.rounds + 1 and all(1 <= x <= k for x in res.ks[:-1])
        assert 0.0 <= res.acceptance_rate <= 1.0
        assert res.cloud_tokens == 1 + sum(x + 1 for x in res.ks)
        if k >= 2:
            assert res.round_trips_per_token < 1.0


def test_greedy_auto_k_stop_and_streaming(gen, baselines):
    prompt, context = CASES[0]
    ref = baselines[prompt]
    pieces = []
    res = gen.generate(prompt, context=context, max_new_tokens=N, speculative="auto",
                       on_text=lambda i, s: pieces.append(s))
    assert res.token_ids == ref.token_ids and "".join(pieces) == res.text
    word = ref.text.split()[3]
    stopped = gen.generate(prompt, context=context, max_new_tokens=N, stop=[word], speculative=4)
    assert stopped.finish_reason == "stop" and word not in stopped.text and ref.text.startswith(stopped.text)
    short = gen.generate(prompt, context=context, max_new_tokens=5, speculative=8)
    assert short.token_ids == ref.token_ids[:5] and short.finish_reason == "length"


CLOUD = {k: Speculation(k, proposal="cloud") for k in (1, 3, 8)}


@pytest.mark.parametrize("prompt,context", CASES)
def test_cloud_drafts_greedy_identical_to_normal_loop(gen, baselines, prompt, context):
    """The LLM drafts (its own greedy continuation, one request per round): token for token the
    normal loop; each round asks the LLM for k + 1 positions."""
    ref = baselines[prompt]
    for k, spec in CLOUD.items():
        res = gen.generate(prompt, context=context, max_new_tokens=N, speculative=spec)
        assert res.token_ids == ref.token_ids and res.text == ref.text and res.finish_reason == ref.finish_reason, k
        assert res.decided == len(ref.token_ids) + (ref.finish_reason == "eos")
        assert res.llm_calls == res.rounds + 1 and all(1 <= x <= k for x in res.ks[:-1])
        assert res.cloud_tokens == 1 + sum(x + 1 for x in res.ks)
        assert 0 <= res.accepted <= res.drafted
        if k >= 3:
            assert res.round_trips_per_token < 1.0


def test_cloud_drafts_batch_stop_strings_gate_and_resume(smol, gen, baselines):
    from costeer.gating import ConfidenceGate

    word = baselines[CASES[2][0]].text.split()[4]
    reqs = [Request(prompt=p, context=c, stop=[word] if i == 2 else ()) for i, (p, c) in enumerate(CASES)]
    normal = gen.generate(reqs, max_new_tokens=N)
    chunks = list(gen.stream(reqs, max_new_tokens=N, speculative=CLOUD[3]))
    by_index = {ch.index: ch.result for ch in chunks if ch.done}
    for i in range(len(reqs)):
        a, b = normal[i], by_index[i]
        assert b.token_ids == a.token_ids and b.text == a.text and b.finish_reason == a.finish_reason, i
        assert "".join(ch.text for ch in chunks if ch.index == i) == b.text
    g = Generator(llm=smol, slm=smol, cfg=gen.cfg, gate=ConfidenceGate(threshold=0.5, patience=2), cobatch=False)
    reqs = [Request(prompt=p, context=c) for p, c in CASES]
    gated = g.generate(reqs, max_new_tokens=N)
    spec = g.generate(reqs, max_new_tokens=N, speculative=CLOUD[3])
    assert [r.token_ids for r in spec] == [r.token_ids for r in gated]
    assert [r.steered_tokens for r in spec] == [r.steered_tokens for r in gated]
    prompt, context = CASES[0]
    full = gen.generate(prompt, context=context, max_new_tokens=N, speculative=CLOUD[3], temperature=0.9, seed=5)
    assert full.token_ids == gen.generate(prompt, context=context, max_new_tokens=N, speculative=CLOUD[3],
                                          temperature=0.9, seed=5).token_ids  # reproducible from the seed
    for cut in (1, 7):
        res = gen.generate(prompt, context=context, max_new_tokens=N, speculative=CLOUD[3], temperature=0.9, seed=5,
                           prefix=[full.token_ids[:cut]])
        assert res.token_ids == full.token_ids, cut


def test_cloud_drafts_need_a_stream_that_continues(gen):
    from costeer.speculative import Drafter

    with pytest.raises(ValueError, match="k='auto' is not available with proposal='cloud'"):
        Speculation("auto", proposal="cloud")

    class ScoresOnly:
        def score_send(self, tokens, rollback=0):
            pass

    with pytest.raises(ValueError, match="proposal 'cloud' needs an LLM that continues"):
        Drafter(CLOUD[1], gen.cfg, None, ScoresOnly(), None, 10, {}, 1, [])
    Drafter(Speculation(1), gen.cfg, None, ScoresOnly(), None, 10, {}, 1, [])  # the device's drafts need scores only


def test_one_model_cobatched_runs_the_step(smol, baselines):
    """The LLM is the in-process small model itself (co-batched): a round's LLM scores would be the
    no-context rows' own, so speculation runs the co-batched step: same tokens, no rounds."""
    g = Generator(llm=smol, slm=smol, cfg=SteerConfig(**CLI_DEFAULTS))
    for k in (4, "auto"):
        reqs = [Request(prompt=p, context=c) for p, c in CASES[:2]]
        res = g.generate(reqs, max_new_tokens=N, speculative=k)
        for r, (p, _) in zip(res, CASES[:2]):
            ref = baselines[p]
            assert r.cobatched and r.rounds == 0 and r.llm_calls == 0 and r.drafted == 0
            assert r.token_ids == ref.token_ids and r.finish_reason == ref.finish_reason
            assert r.decided == len(ref.token_ids) + (ref.finish_reason == "eos")
            assert r.round_trips_per_token == 0.0 and "no rounds" in r.spec_summary()
    drafting = Generator(llm=smol, slm=smol, cfg=SteerConfig(**CLI_DEFAULTS), cobatch=False)
    r = drafting.generate(CASES[0][0], context=CASES[0][1], max_new_tokens=6, speculative=2)
    assert not r.cobatched and r.rounds >= 1


def test_adaptive_k_follows_acceptance_and_costs():
    a = AdaptiveK(4, k_max=16)
    for _ in range(10):
        a.update(8, 8, t_round=0.1, t_local=0.001)  # everything accepted, rounds expensive: long drafts
    assert a.k >= 12
    for _ in range(10):
        a.update(4, 0, t_round=0.1, t_local=0.001)  # nothing accepted: short drafts
    assert a.k <= 3 and a.alpha < 0.35
    b = AdaptiveK(4)
    for _ in range(10):
        b.update(4, 3, t_round=0.001, t_local=0.01)  # local steps dominate: short drafts
    assert b.k <= 2


def test_bad_arguments(gen):
    prompt, context = CASES[0]
    for bad in (0, "fast", -2):
        with pytest.raises(ValueError):
            gen.generate(prompt, context=context, speculative=bad)
    with pytest.raises(TypeError, match="speculative"):  # a bool is not a draft length
        gen.generate(prompt, context=context, speculative=True)
    with pytest.raises(TypeError):
        gen.generate(prompt, context=context, speculative=2.5)
    with pytest.raises(ValueError):
        Speculation(2, proposal="other")
    with pytest.raises(ValueError, match="mode 'costeer'"):
        gen.generate(prompt, context=context, speculative=2, mode="llm")
    hooked = Generator(llm=gen.llm, slm=gen.slm, cfg=gen.cfg, gate=lambda i, step, lp: True)
    with pytest.raises(ValueError, match="ConfidenceGate"):
        hooked.generate(prompt, context=context, speculative=2)


# ---------------------------------------------------------------------------------------------
# rollback


def test_rollback_equals_fresh_prefill(smol):
    tok = smol.tokenizer
    rows = [tok("Hello there, how are you today?")["input_ids"], tok("Hi")["input_ids"]]
    extra = tok(" I am fine, thank you very much")["input_ids"][:6]
    kept = 2
    spec = KVBatch(smol.model, rows, smol.pad_token_id)
    spec.prefill()
    spec.step([extra[0]] * 2)  # a normal step, then a multi-token extend
    out = spec.extend([extra[1:], extra[1:]])
    assert out.logits.shape[:2] == (2, len(extra) - 1)
    spec.rollback(len(extra) - kept)
    fresh = KVBatch(smol.model, [r + extra[:kept] for r in rows], smol.pad_token_id)
    fresh.prefill()
    assert torch.equal(spec._mask, fresh._mask)
    assert torch.equal(spec._next_pos, fresh._next_pos) and torch.equal(spec.lengths, fresh.lengths)
    assert spec.cache.get_seq_length() == fresh.cache.get_seq_length()
    for a, b in zip(spec.cache.layers, fresh.cache.layers):
        assert a.keys.shape == b.keys.shape
        torch.testing.assert_close(a.keys, b.keys, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(a.values, b.values, atol=2e-4, rtol=1e-4)
    nxt = [extra[kept], extra[kept]]
    torch.testing.assert_close(spec.step(nxt).logits, fresh.step(nxt).logits, atol=2e-3, rtol=1e-4)
    with pytest.raises(ValueError):
        spec.rollback(10**6)


# ---------------------------------------------------------------------------------------------
# sampling: the output distribution is the steered one


def test_verify_rule_preserves_the_target_distribution():
    """Synthetic rows: position-independent p_i and q_i, drafts drawn from q with steer_sample; the
    first token the verification op emits is distributed as p_1 and the second (when the first
    draft was accepted) as p_2."""
    g = torch.Generator().manual_seed(0)
    V, k, n = 6, 2, 6000
    zl = torch.randn(k + 1, V, generator=g) * 1.5
    zero = torch.zeros(k + 1, V)
    y = torch.randn(k, V, generator=g) * 1.5  # the proposal's logits
    p = torch.softmax(zl.double(), -1)
    first = torch.zeros(V)
    second = torch.zeros(V)
    for s in range(n):
        drafts = steer_sample(y, y, y, SteerConfig(T=0), temperature=1.0, seed=10**6 + s)[0]
        j, tok = speculative_verify(zl, zero, None, drafts, SteerConfig(T=0), draft_logits=y, temperature=1.0, seed=s)
        out = drafts.tolist()[:j] + [tok]
        first[out[0]] += 1
        if len(out) > 1:
            second[out[1]] += 1
    for counts, probs in ((first, p[0]), (second, p[1])):
        stat, df = chi2(counts, probs)
        assert stat < chi2_critical(df), (stat, df)
    # the same seed and offset give the same decision
    d = steer_sample(y, y, y, SteerConfig(T=0), temperature=1.0, seed=3)[0]
    assert speculative_verify(zl, zero, None, d, draft_logits=y, temperature=1.0, seed=7, offset=2) == \
        speculative_verify(zl, zero, None, d, draft_logits=y, temperature=1.0, seed=7, offset=2)
    # greedy rule: accept while the draft is the argmax, then the argmax
    best = zl.argmax(-1).tolist()
    cfg0 = SteerConfig(T=0)
    assert speculative_verify(zl, zero, None, torch.tensor(best[:k]), cfg0) == (k, best[k])
    wrong = (best[0] + 1) % V
    assert speculative_verify(zl, zero, None, torch.tensor([wrong, best[1]]), cfg0) == (0, best[0])


class _CharTok:
    """A tokenizer for the tiny random models: each character is id ord(c) % V."""

    chat_template = None

    def __init__(self, V):
        self.V = V

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) % self.V for c in text]}

    def __len__(self):
        return self.V

    def get_vocab(self):
        return {chr(97 + i): i for i in range(self.V)}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + int(i)) for i in ids)


def _tiny(seed, V):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=256)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(40.0)  # peaked rows: q and p differ a lot, many rejections
    return LoadedModel(name=f"tiny{seed}", model=m, tokenizer=_CharTok(V), vocab_size=V, max_len=256,
                       eos_token_ids=[], pad_token_id=0)


def _exact_joint(llm, slm, cfg, pub, ctx, noctx, V, n_tok):
    """The steered joint distribution of the first ``n_tok`` tokens, by enumeration in float64."""
    def last(model, ids):
        with torch.inference_mode():
            return model(input_ids=torch.tensor([ids])).logits[0, -1].float()

    exact = torch.zeros([V] * n_tok, dtype=torch.float64)

    def fill(prefix, prob):
        if len(prefix) == n_tok:
            exact[tuple(prefix)] = prob
            return
        lp = steer(last(llm.model, pub + prefix)[None], last(slm.model, ctx + prefix)[None],
                   last(slm.model, noctx + prefix)[None], cfg)[0]
        p = torch.softmax(lp.double(), -1)
        for t in range(V):
            fill(prefix + [t], prob * float(p[t]))

    fill([], 1.0)
    return exact


@pytest.mark.parametrize("proposal", ["ctx", "proxy", "cloud"])
def test_sampling_distribution_tiny_model(proposal):
    """End to end on tiny random models (LLM != small model): the joint distribution of the first
    3 sampled tokens equals the steered distribution computed exactly by enumeration."""
    from costeer.loop import build_prompts

    V, n_tok, n = 3, 4, 1000
    llm, slm = _tiny(1, V), _tiny(2, V)
    cfg = SteerConfig(T=3)
    gen = Generator(llm=llm, slm=slm, cfg=cfg)
    prompt, context = "ab", "cd"
    pub, ctx, noctx = build_prompts(llm.tokenizer, slm.tokenizer, prompt, context)

    exact = _exact_joint(llm, slm, cfg, pub, ctx, noctx, V, n_tok)
    spec = Speculation(2, proposal=proposal)
    counts = torch.zeros([V] * n_tok)
    drafted = accepted = 0
    for s in range(n):
        res = gen.generate(prompt, context=context, max_new_tokens=n_tok, temperature=1.0, seed=s, speculative=spec)
        assert len(res.token_ids) == n_tok
        counts[tuple(res.token_ids)] += 1
        drafted, accepted = drafted + res.drafted, accepted + res.accepted
    assert 0 < accepted < drafted  # both branches ran
    stat, df = chi2(counts, exact)
    assert stat < chi2_critical(df), (stat, df)


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_speculative_prints_round_trips(smol, baselines, capsys):
    from costeer.cli import main as cli_main

    prompt, context = CASES[1]
    rc = cli_main(["generate", "--prompt", prompt, "--context", context, "--max-new-tokens", str(N),
                   "--speculative", "4", "--quiet"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    assert out[0] == baselines[prompt].text
    # The CLI's one model in both roles is co-batched: the step runs, no round trips (see below).
    assert out[-1].startswith("speculative: no rounds") and "round trips/token: " in out[-1]
    assert float(out[-1].rsplit("round trips/token: ", 1)[1]) == 0.0
    assert cli_main(["generate", "--prompt", prompt, "--context", context, "--speculative", "0"]) == 2
    assert cli_main(["generate", "--prompt", prompt, "--context", context, "--speculative", "x"]) == 2


# ---------------------------------------------------------------------------------------------
# through `costeer serve`: op "score" with rollback


def test_served_speculative_equals_in_process(server, smol, gen, baselines):
    from costeer.serve import protocol as P
    from costeer.llm import StreamError, WebSocketLLMStream

    g = Generator(llm=None, slm=smol, llm_url=server.url, cfg=gen.cfg, transport_dtype="float32")
    try:
        for prompt, context in CASES[:2]:
            res = g.generate(prompt, context=context, max_new_tokens=N, speculative=4)
            assert res.token_ids == baselines[prompt].token_ids
            assert res.round_trips_per_token < 0.5 and res.llm_calls == res.rounds + 1
    finally:
        g.close()
    # protocol: scores after rollback equal a plain step; bad requests are refused, session stays usable
    s = WebSocketLLMStream(server.url, dtype="float32")
    try:
        ids = smol.tokenizer("Hello there")["input_ids"]
        s.open([ids])
        s.recv()
        s.score_send([[11, 12, 13]])
        three = s.score_recv(3).logits
        assert three.shape == (3, smol.vocab_size)
        s.score_send([[12, 99]], rollback=2)  # back to [ids, 11], then 12, 99
        two = s.score_recv(2).logits
        torch.testing.assert_close(two[0], three[1], atol=2e-3, rtol=1e-4)
        s.send([7])  # a normal step continues the same session
        assert s.recv().logits.shape == (1, smol.vocab_size)
        for header, payload in (({"op": "score", "sid": s._sid, "n": 0}, b""),
                                ({"op": "score", "sid": s._sid, "n": 1, "rollback": 10**6}, P.pack_int32([1])),
                                ({"op": "score", "sid": s._sid, "n": 2}, P.pack_int32([1])),
                                ({"op": "score", "sid": s._sid, "n": 1}, P.pack_int32([10**8]))):
            with pytest.raises(StreamError):
                s._request(header, payload)
        s.score_send([[5]], rollback=1)
        assert s.score_recv(1).logits.shape == (1, smol.vocab_size)
        with pytest.raises(ValueError):
            s.score_send([[1], []])
    finally:
        s.close()


# ---------------------------------------------------------------------------------------------
# the policy inside the one loop: batch > 1, gate, stop strings, resume, sampled reproducibility


def test_batch_greedy_identical_to_normal_loop_with_stop_strings(gen, baselines):
    word = baselines[CASES[2][0]].text.split()[4]
    reqs = [Request(prompt=p, context=c, stop=[word] if i == 2 else ()) for i, (p, c) in enumerate(CASES)]
    normal = gen.generate(reqs, max_new_tokens=N)
    chunks = list(gen.stream(reqs, max_new_tokens=N, speculative=4))
    spec = [ch.result for ch in chunks if ch.done]
    by_index = {ch.index: ch.result for ch in chunks if ch.done}
    for i in range(len(reqs)):
        a, b = normal[i], by_index[i]
        assert b.token_ids == a.token_ids and b.text == a.text and b.finish_reason == a.finish_reason, i
        assert "".join(ch.text for ch in chunks if ch.index == i) == b.text  # streamed text is the result
        assert [ch.token for ch in chunks if ch.index == i and ch.token is not None] == b.token_ids
        assert b.llm_calls == b.rounds + 1 and b.round_trips_per_token < 1.0
    assert by_index[2].finish_reason == "stop" and word not in by_index[2].text
    assert spec[0].timings is spec[1].timings and len(spec[0].timings) == max(r.rounds for r in spec) + 1


def test_gate_greedy_identical_to_normal_loop(smol, gen):
    from costeer.gating import ConfidenceGate

    g = Generator(llm=smol, slm=smol, cfg=gen.cfg, gate=ConfidenceGate(threshold=0.5, patience=2), cobatch=False)
    reqs = [Request(prompt=p, context=c) for p, c in CASES]
    normal = g.generate(reqs, max_new_tokens=N)
    spec = g.generate(reqs, max_new_tokens=N, speculative=3)
    assert [r.token_ids for r in spec] == [r.token_ids for r in normal]
    assert [r.steered_tokens for r in spec] == [r.steered_tokens for r in normal]
    assert any(r.steered_tokens < len(r.token_ids) for r in normal)  # the gate switched something off


def test_resume_continues_the_interrupted_run(gen):
    prompt, context = CASES[0]
    for kw in (dict(), dict(temperature=0.9, top_p=0.95, seed=11)):
        full = gen.generate(prompt, context=context, max_new_tokens=N, speculative=4, **kw)
        for cut in (1, 6, 13):
            res = gen.generate(prompt, context=context, max_new_tokens=N, speculative=4,
                               prefix=[full.token_ids[:cut]], **kw)
            assert res.token_ids == full.token_ids, (kw, cut)


def test_sampled_output_is_reproducible_from_the_seed(gen):
    reqs = [Request(prompt=p, context=c, temperature=0.9, top_k=40, seed=100 + i) for i, (p, c) in enumerate(CASES)]
    a = gen.generate(reqs, max_new_tokens=N, speculative=4)
    b = gen.generate(reqs, max_new_tokens=N, speculative=4)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    other = gen.generate([Request(**{**r.__dict__, "seed": r.seed + 7}) for r in reqs], max_new_tokens=N,
                         speculative=4)
    assert [r.token_ids for r in other] != [r.token_ids for r in a]


# ---------------------------------------------------------------------------------------------
# the verification op: batched, exact against float64, steer_sample's RNG contract


def _reference_probs(x: torch.Tensor, tau: float, top_k: int, top_p: float) -> torch.Tensor:
    """float64 probabilities of steer_sample's filtered distribution, by a literal sort (no op code)."""
    x = x.double()
    order = torch.argsort(x, descending=True)
    keep = torch.zeros_like(x, dtype=torch.bool)
    kept = order[:top_k] if top_k else order
    w = torch.softmax(x[kept] / tau, 0)
    mass, n = 0.0, 0
    for n, v in enumerate(w.tolist(), 1):
        mass += v
        if mass >= top_p:
            break
    keep[kept[:n]] = True
    p = torch.zeros_like(x)
    p[keep] = torch.softmax(x[keep] / tau, 0)
    return p


def test_batched_verify_is_exact_against_float64():
    """B = 4000 requests in ONE call, each its own seed: the first two emitted tokens are
    distributed as the float64 steered, tempered, filtered distributions p_1 and p_2 (chi-square,
    fixed seeds), with top-k / top-p filters applied to p and q alike."""
    g = torch.Generator().manual_seed(1)
    B, k, V = 4000, 2, 12
    zl1, zc1, zn1 = (torch.randn(k + 1, V, generator=g) * 2 for _ in range(3))
    cfg = SteerConfig(T=5)
    y1 = steer(zl1, zc1, zn1, cfg)[:k] + torch.randn(k, V, generator=g)  # a proposal near p: accepts and rejections
    tau, top_k, top_p = 0.8, 9, 0.9
    zl, zc, zn, y = (t.expand(B, *t.shape).contiguous() for t in (zl1, zc1, zn1, y1))
    seeds = torch.arange(B, dtype=torch.int64) * 7919 + 3
    drafts = steer_sample(y.flatten(0, 1), y.flatten(0, 1), None, SteerConfig(T=0), temperature=tau, top_k=top_k,
                          top_p=top_p, seed=seeds.repeat_interleave(k) ^ 0x5DEECE66D)[0].view(B, k)
    j, tok = speculative_verify(zl, zc, zn, drafts, cfg, draft_logits=y, temperature=tau, top_k=top_k, top_p=top_p,
                                seed=seeds, offset=9)
    assert 0 < int((j < k).sum()) < B, j.bincount().tolist()  # rejections (residual draws) and full accepts both ran
    d, jl, tl = drafts.tolist(), j.tolist(), tok.tolist()
    out = [d[b][:jl[b]] + [tl[b]] for b in range(B)]
    x = steer(zl1, zc1, zn1, cfg)
    first = torch.bincount(torch.tensor([o[0] for o in out]), minlength=V)
    second = torch.bincount(torch.tensor([o[1] for o in out if len(o) > 1]), minlength=V)
    for counts, probs in ((first, _reference_probs(x[0], tau, top_k, top_p)),
                          (second, _reference_probs(x[1], tau, top_k, top_p))):
        stat, df = chi2(counts, probs)  # df = 0: one allowed token, every sample on it (checked by chi2)
        assert df == 0 or stat < chi2_critical(df), (stat, df)
    # request b's decision depends on its own seed only, not on its slot or the batch
    for b in (0, 17, B - 1):
        jb, tb = speculative_verify(zl1, zc1, zn1, drafts[b], cfg, draft_logits=y1, temperature=tau, top_k=top_k,
                                    top_p=top_p, seed=int(seeds[b]), offset=9)
        assert (int(jb), int(tb)) == (jl[b], tl[b])


def test_verify_without_drafts_draws_what_steer_sample_draws():
    g = torch.Generator().manual_seed(2)
    zl, zc, zn = (torch.randn(5, 1, 300, generator=g) * 3 for _ in range(3))
    seeds = torch.tensor([3, 4, 5, 6, 2**62], dtype=torch.int64)
    none = torch.zeros((5, 0), dtype=torch.int64)
    for tau in (0.0, 0.7):
        j, tok = speculative_verify(zl, zc, zn, none, SteerConfig(T=4), temperature=tau, seed=seeds, offset=21)
        want = steer_sample(zl[:, 0], zc[:, 0], zn[:, 0], SteerConfig(T=4), temperature=tau, seed=seeds, offset=21)[0]
        assert j.tolist() == [0] * 5 and torch.equal(tok, want)


def test_verify_bad_arguments():
    zl = torch.randn(2, 3, 10)
    d = torch.zeros(2, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="draft_logits"):
        speculative_verify(zl, zl, zl, d, temperature=1.0)
    with pytest.raises(ValueError, match="slm_ctx_logits"):
        speculative_verify(zl, zl[:, :2], zl, d)
    with pytest.raises(ValueError, match="drafts"):
        speculative_verify(zl, zl, zl, d + 10)
    with pytest.raises(TypeError, match="drafts"):
        speculative_verify(zl, zl, zl, d.float())
    bad = zl.clone()
    bad[1, 2, 4] = float("nan")
    with pytest.raises(ValueError, match="request 1"):
        speculative_verify(bad, zl, zl, d)
    j, tok = speculative_verify(bad, zl, zl, d, validate=False)
    assert int(tok[1]) == -1 and int(j[1]) == 0 and int(tok[0]) >= 0


def test_sampling_distribution_tiny_model_batched():
    """The loop's speculative policy at batch 600 (rows advance by the batch's least accepted
    count): the joint distribution of 3 sampled tokens is still the exact steered one."""
    from costeer.loop import build_prompts

    V, n_tok, n = 3, 3, 600
    llm, slm = _tiny(1, V), _tiny(2, V)
    cfg = SteerConfig(T=3)
    gen = Generator(llm=llm, slm=slm, cfg=cfg)
    prompt, context = "ab", "cd"
    pub, ctx, noctx = build_prompts(llm.tokenizer, slm.tokenizer, prompt, context)

    exact = _exact_joint(llm, slm, cfg, pub, ctx, noctx, V, n_tok)
    reqs = [Request(prompt=prompt, context=context, temperature=1.0, seed=5000 + s) for s in range(n)]
    res = gen.generate(reqs, max_new_tokens=n_tok, speculative=2)
    counts = torch.zeros([V] * n_tok)
    for r in res:
        assert len(r.token_ids) == n_tok
        counts[tuple(r.token_ids)] += 1
    assert 0 < sum(r.accepted for r in res) < sum(r.drafted for r in res)
    stat, df = chi2(counts, exact)
    assert stat < chi2_critical(df), (stat, df)
