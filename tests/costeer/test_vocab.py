"""Vocabulary maps across tokenizers (byte-level BPE vs SentencePiece), steering through them, and
padded logit widths. Tokenizer files are created here with the ``tokenizers`` library (no
downloads)."""
import random

import pytest
import torch

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402

import costeer_kernels as ck  # noqa: E402
from costeer.vocab import VocabMap, build_vocab_map, normalize_token  # noqa: E402
from costeer_kernels import steer  # noqa: E402
from costeer_kernels.projection import steer_from_hidden  # noqa: E402

from ..conftest import DEVICE  # noqa: E402

CORPUS = [
    "Hello world, the quick brown fox jumps over the lazy dog.",
    "Zürich is nice; café crème, naïve façade!\nNew line here.\tTabs too.",
    "the theory of everything is hard to test 12345",
] * 20
TRITON = ["triton"] if "triton" in ck.available_backends() else []


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory):
    """A trained byte-level BPE tokenizer and a SentencePiece-style one (Metaspace, byte
    fallback <0xNN>) over mostly the same pieces, with shuffled ids, saved as tokenizer.json."""
    d = tmp_path_factory.mktemp("tok")
    bl = tokenizers.ByteLevelBPETokenizer()
    bl.train_from_iterator(CORPUS, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>", "<unk>"],
                           show_progress=False)
    bl_path = d / "bpe.json"
    bl.save(str(bl_path))
    bpe = Tokenizer.from_file(str(bl_path))

    # SentencePiece-style: the same pieces spelled with "▁", plus 256 byte tokens, a few pieces
    # of its own; every third byte-level piece left out.
    rng = random.Random(0)
    pieces = []
    for tok in sorted(bpe.get_vocab()):
        if tok in ("<|endoftext|>", "<unk>"):
            continue
        b = normalize_token(tok, "byte_level")
        try:
            text = b.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if len(b) > 1 and text not in (" the", "é", "Ã") and rng.random() < 1 / 3:
            continue
        pieces.append(text.replace(" ", "\u2581"))
    pieces += ["\u2581zzyzx", "\u2581qq"]
    pieces += [f"<0x{i:02X}>" for i in range(256)]
    pieces = sorted(set(pieces))
    rng.shuffle(pieces)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for p in pieces:
        vocab.setdefault(p, len(vocab))
    sp = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    sp.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    sp.add_special_tokens(["<unk>", "<s>", "</s>"])
    sp_path = d / "sp.json"
    sp.save(str(sp_path))
    return bl_path, sp_path


@pytest.fixture(scope="module")
def tokenizers_pair(tokenizer_files):
    return tuple(Tokenizer.from_file(str(p)) for p in tokenizer_files)


def _brute_force(llm_vocab, slm_vocab, llm_specials, slm_specials, llm_scheme, slm_scheme):
    def key(tok, specials, scheme):
        return ("s", tok) if tok in specials else ("b", normalize_token(tok, scheme))

    best = {}
    for tok, i in slm_vocab.items():
        k = key(tok, slm_specials, slm_scheme)
        best[k] = min(i, best.get(k, i))
    return {i: best.get(key(tok, llm_specials, llm_scheme), -1) for tok, i in llm_vocab.items()}


def test_normalize_token():
    assert normalize_token("Ġthe", "byte_level") == b" the"
    assert normalize_token("Ċ", "byte_level") == b"\n"
    assert normalize_token("Ã©", "byte_level") == "é".encode()
    assert normalize_token("\u2581the", "sentencepiece") == b" the"
    assert normalize_token("<0x0A>", "sentencepiece") == b"\n"
    assert normalize_token("é", "sentencepiece") == "é".encode()
    assert normalize_token("<not a byte>", "byte_level") is None


def test_bpe_to_sentencepiece(tokenizers_pair):
    bpe, sp = tokenizers_pair
    vm = build_vocab_map(bpe, sp)
    assert (vm.llm_scheme, vm.slm_scheme) == ("byte_level", "sentencepiece")
    bv, sv = bpe.get_vocab(), sp.get_vocab()
    assert vm.llm_size == max(bv.values()) + 1 and vm.slm_size == max(sv.values()) + 1
    idx = vm.slm_index
    assert idx.dtype == torch.int32 and idx.shape == (vm.llm_size,)
    # Spaces, newlines, accented characters and bytes meet across the two encodings.
    assert idx[bv["Ġthe"]] == sv["\u2581the"]
    assert idx[bv["Ċ"]] == min(sv["<0x0A>"], sv.get("\n", 10**9))
    assert idx[bv["Ã©"]] == sv["é"]
    assert idx[bv["Ã"]] == sv["<0xC3>"]  # a lone UTF-8 lead byte: only SentencePiece's byte token
    assert idx[bv["<unk>"]] == sv["<unk>"]  # special tokens match by string
    assert idx[bv["<|endoftext|>"]] == -1
    # Exactly the brute-force matching, and coverage counts that add up.
    bspec = {t.content for t in bpe.get_added_tokens_decoder().values() if t.special}
    sspec = {t.content for t in sp.get_added_tokens_decoder().values() if t.special}
    expect = _brute_force(bv, sv, bspec, sspec, "byte_level", "sentencepiece")
    assert {i: int(idx[i]) for i in expect} == expect
    cov = vm.coverage
    assert cov["matched"] + cov["llm_only"] == vm.llm_size
    assert cov["matched"] == sum(1 for j in expect.values() if j >= 0)
    assert cov["slm_only"] == vm.slm_size - len({j for j in expect.values() if j >= 0})
    assert 0.5 < cov["llm_coverage"] < 1.0 and cov["slm_only"] > 0
    # Matched tokens decode to the same text.
    for i in range(vm.llm_size):
        j = int(idx[i])
        tok = bpe.id_to_token(i)
        if j >= 0 and tok not in bspec and not tok.startswith("Ġ"):
            b = normalize_token(tok, "byte_level")
            if b.isascii():
                assert sp.decode([j], skip_special_tokens=False) == b.decode(), tok


def test_reverse_direction_and_files(tokenizer_files):
    bl_path, sp_path = tokenizer_files
    sp, bpe = Tokenizer.from_file(str(sp_path)), Tokenizer.from_file(str(bl_path))
    vm = build_vocab_map(sp, bpe)
    sv, bv = sp.get_vocab(), bpe.get_vocab()
    assert vm.slm_index[sv["\u2581the"]] == bv["Ġthe"]
    assert vm.slm_index[sv["\u2581zzyzx"]] == -1
    assert vm.slm_index[sv["<0x0A>"]] == bv["Ċ"]


def test_plain_mappings_and_forced_schemes():
    vm = build_vocab_map({"a": 0, "b": 1, "c": 2}, {"c": 0, "a": 1})
    assert vm.slm_index.tolist() == [1, -1, 0]
    assert (vm.matched, vm.llm_only, vm.slm_only) == (2, 1, 0)
    vm = build_vocab_map({"Ġx": 0}, {"\u2581x": 0, "y": 1}, llm_scheme="byte_level", slm_scheme="sentencepiece",
                         llm_size=4)
    assert vm.slm_index.tolist() == [0, -1, -1, -1] and vm.slm_only == 1
    with pytest.raises(ValueError, match="llm_scheme"):
        build_vocab_map({"a": 0}, {"a": 0}, llm_scheme="wordpiece")
    with pytest.raises(TypeError, match="tokenizer"):
        build_vocab_map(42, {"a": 0})


def test_vocab_map_validation():
    with pytest.raises(ValueError, match="out-of-range entry 5"):
        VocabMap(torch.tensor([0, 5, -1]), slm_size=5)
    with pytest.raises(ValueError, match="out-of-range entry -2"):
        VocabMap(torch.tensor([0, -2]), slm_size=5)
    with pytest.raises(TypeError, match="integers"):
        VocabMap(torch.tensor([0.0, 1.0]), slm_size=5)
    vm = VocabMap(torch.tensor([2, -1, 0]), slm_size=3)
    assert vm.padded(5).slm_index.tolist() == [2, -1, 0, -1, -1]


def _mapped_reference(zl, zc, zn, idx, unmapped):
    valid = idx >= 0
    g = idx.clamp(min=0).long()
    zcg = torch.where(valid, zc[:, g], torch.zeros(()))
    zng = torch.where(valid, zn[:, g], torch.zeros(()))
    zl = zl.clone()
    if unmapped == "drop":
        zl[:, ~valid] = float("-inf")
    return ck.closed_form_steer(zl.double(), zcg.double(), zng.double(), dtype=torch.float64)


@pytest.mark.parametrize("unmapped", ["keep", "drop"])
@pytest.mark.parametrize("backend", [None, "torch"] + TRITON)
def test_steer_through_a_tokenizer_map(tokenizers_pair, backend, unmapped):
    bpe, sp = tokenizers_pair
    vm = build_vocab_map(bpe, sp)
    g = torch.Generator().manual_seed(1)
    B = 3
    zl = torch.randn(B, vm.llm_size, generator=g) * 3
    zc = torch.randn(B, vm.slm_size, generator=g) * 3
    zn = torch.randn(B, vm.slm_size, generator=g) * 3
    out = steer(zl.to(DEVICE), zc.to(DEVICE), zn.to(DEVICE), vocab_map=vm, unmapped=unmapped, backend=backend)
    ref = _mapped_reference(zl, zc, zn, vm.slm_index, unmapped)
    assert torch.equal(torch.isneginf(out.cpu()), torch.isneginf(ref))
    fin = torch.isfinite(ref)
    assert (out.cpu().double()[fin] - ref[fin]).abs().max() < 2e-5
    # The same map as a raw int64 tensor.
    out2 = steer(zl.to(DEVICE), zc.to(DEVICE), zn.to(DEVICE), vocab_map=vm.slm_index.long().to(DEVICE),
                 unmapped=unmapped, backend=backend)
    assert torch.allclose(out2, out, atol=1e-6, equal_nan=False) or torch.equal(out2, out)


@pytest.mark.parametrize("backend", ["torch"] + TRITON)
def test_iterative_mode_through_a_map(backend):
    g = torch.Generator().manual_seed(2)
    zl, zc, zn = torch.randn(2, 301, generator=g), torch.randn(2, 250, generator=g), torch.randn(2, 250, generator=g)
    idx = torch.randint(-1, 250, (301,), generator=g)
    cfg = ck.SteerConfig(T=3)
    for unmapped in ("keep", "drop"):
        out = steer(zl.to(DEVICE), zc.to(DEVICE), zn.to(DEVICE), cfg, vocab_map=idx.to(DEVICE), unmapped=unmapped,
                    backend=backend, mode="iterative")
        closed = steer(zl.to(DEVICE), zc.to(DEVICE), zn.to(DEVICE), cfg, vocab_map=idx.to(DEVICE),
                       unmapped=unmapped, backend="torch")
        fin = torch.isfinite(closed)
        assert torch.equal(torch.isfinite(out), fin)
        assert (out[fin] - closed[fin]).abs().max() < 1e-4


def test_map_errors_and_backend_choice():
    g = torch.Generator().manual_seed(3)
    zl, zc, zn = torch.randn(2, 50, generator=g), torch.randn(2, 40, generator=g), torch.randn(2, 40, generator=g)
    idx = torch.randint(-1, 40, (50,), generator=g)
    bad = idx.clone()
    bad[7] = 40
    with pytest.raises(ValueError, match="vocab_map has an out-of-range entry 40"):
        steer(zl, zc, zn, vocab_map=bad)
    bad[7] = -3
    with pytest.raises(ValueError, match="out-of-range entry -3"):
        steer(zl, zc, zn, vocab_map=bad)
    with pytest.raises(ValueError, match="vocab_map has 49 entries"):
        steer(zl, zc, zn, vocab_map=idx[:49])
    with pytest.raises(TypeError, match="vocab_map must hold integer"):
        steer(zl, zc, zn, vocab_map=idx.float())
    with pytest.raises(TypeError, match="vocab_map must be"):
        steer(zl, zc, zn, vocab_map=[0, 1])
    with pytest.raises(ValueError, match="unmapped"):
        steer(zl, zc, zn, vocab_map=idx, unmapped="skip")
    with pytest.raises(ValueError, match="slm_noctx_logits has width 39"):
        steer(zl, zc, zn[:, :39], vocab_map=idx)
    with pytest.raises(ValueError, match="small-model vocabulary of 41"):
        steer(zl, zc, zn, vocab_map=VocabMap(idx, slm_size=41))
    # validate=False: no host check; an out-of-range entry reads as unmapped (no stray access).
    bad[7] = 10**6
    out = steer(zl, zc, zn, vocab_map=bad, validate=False)
    bad[7] = -1
    assert torch.allclose(out, steer(zl, zc, zn, vocab_map=bad), atol=1e-6)
    # Backends without vocab_map support: skipped by default, an error when named.
    unsupported = [b for b in ck.available_backends() if not ck.registry.has_kernel(b, "steer_mapped")]
    for name in unsupported:
        with pytest.raises(ValueError, match=f"backend='{name}' does not support vocab_map"):
            steer(zl, zc, zn, vocab_map=idx, backend=name)
    assert ck.registry.has_kernel(ck.registry.resolve("steer_mapped", None, zl.device), "steer_mapped")


@pytest.mark.parametrize("backend", sorted(set(ck.available_backends()) - {"triton"}) + TRITON)
def test_padded_vocab_size(backend):
    """The Qwen2.5-7B / 1.5B case: one tokenizer, logit widths 152064 and 151936 (scaled down in
    the Triton interpreter)."""
    if backend == "triton" and DEVICE == "cpu":
        V_llm, V_slm, N = 1152, 1024, 1000
    else:
        V_llm, V_slm, N = 152064, 151936, 151665
    g = torch.Generator().manual_seed(4)
    zl = (torch.randn(2, V_llm, generator=g) * 3).to(DEVICE)
    zc = (torch.randn(2, V_slm, generator=g) * 3).to(DEVICE)
    zn = (torch.randn(2, V_slm, generator=g) * 3).to(DEVICE)
    with pytest.raises(ValueError, match="shape"):
        steer(zl, zc, zn, backend=backend)  # without vocab_size the widths must match
    out = steer(zl, zc, zn, vocab_size=N, backend=backend)
    assert out.shape == (2, V_llm)
    assert torch.isneginf(out[:, N:]).all()
    ref = ck.closed_form_steer(zl[:, :N].cpu(), zc[:, :N].cpu(), zn[:, :N].cpu(), dtype=torch.float64)
    assert (out[:, :N].cpu().double() - ref).abs().max() < 5e-5
    assert torch.allclose(out[:, :N].exp().sum(1).cpu(), torch.ones(2, dtype=torch.float32), atol=1e-4)
    with pytest.raises(ValueError, match="vocab_size"):
        steer(zl, zc, zn, vocab_size=V_slm + 1, backend=backend)
    with pytest.raises(ValueError, match="vocab_size must be >= 1"):
        steer(zl, zc, zn, vocab_size=0, backend=backend)
    with pytest.raises(TypeError, match="vocab_size"):
        steer(zl, zc, zn, vocab_size=2.5, backend=backend)
    # out= and 1-D inputs keep working with vocab_size.
    buf = torch.full((V_llm,), 7.0, device=DEVICE)
    res = steer(zl[0], zc[0], zn[0], vocab_size=N, backend=backend, out=buf)
    assert res is buf and torch.allclose(buf, out[0], atol=1e-6, equal_nan=True)
    # An invalid row with validate=False is all-NaN, padding included.
    zl[1, 3] = float("nan")
    bad = steer(zl, zc, zn, vocab_size=N, backend=backend, validate=False)
    assert torch.isnan(bad[1]).all() and torch.isneginf(bad[0, N:]).all()


@pytest.mark.parametrize("backend", [None] + TRITON)
def test_from_hidden_through_a_map_and_padding(backend):
    g = torch.Generator().manual_seed(5)
    V_llm, V_w, H, B = 333, 301, 37, 2
    W = torch.randn(V_w, H, generator=g) * 0.3
    hc, hn = torch.randn(B, H, generator=g), torch.randn(B, H, generator=g)
    zl = torch.randn(B, V_llm, generator=g) * 3
    idx = torch.randint(-1, V_w, (V_llm,), generator=g)
    zc, zn = hc.double() @ W.double().T, hn.double() @ W.double().T
    for unmapped in ("keep", "drop"):
        ref = _mapped_reference(zl.double(), zc, zn, idx, unmapped)
        out = steer_from_hidden(zl.to(DEVICE), hc.to(DEVICE), hn.to(DEVICE), W.to(DEVICE), vocab_map=idx.to(DEVICE),
                                unmapped=unmapped, backend=backend).cpu()
        assert torch.equal(torch.isneginf(out), torch.isneginf(ref))
        fin = torch.isfinite(ref)
        assert (out.double()[fin] - ref[fin]).abs().max() < 5e-5
    # Padded rows: W has 301 rows, the LLM 333 logits, the tokenizer 290 tokens.
    out = steer_from_hidden(zl.to(DEVICE), hc.to(DEVICE), hn.to(DEVICE), W.to(DEVICE), vocab_size=290,
                            backend=backend).cpu()
    ref = ck.closed_form_steer(zl[:, :290].double(), zc[:, :290], zn[:, :290], dtype=torch.float64)
    assert out.shape == (B, V_llm) and torch.isneginf(out[:, 290:]).all()
    assert (out[:, :290].double() - ref).abs().max() < 5e-5
