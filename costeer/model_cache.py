"""The model cache: a GGUF model de-quantized once, loaded from a plain folder afterwards.

Loading a GGUF file through transformers rebuilds the tokenizer from the file's metadata and
de-quantizes every tensor on every start (about 40 s for SmolLM2-135M on 2 cores). The first use
of a GGUF model here does that once and writes what it produced to a cache entry::

    <cache>/<name>-<sha256[:16]>-tf<major.minor>-gguf<major.minor>-v<format>/
        model.safetensors        float32 weights, Hugging Face names (a tied lm_head.weight is left out)
        config.json              no quantization_config; architectures = the loaded class
        generation_config.json
        tokenizer.json, tokenizer_config.json, ... (tokenizer.save_pretrained)
        lm_head.q8_0             the GGUF's vocabulary head as stored, when it is Q8_0 (safetensors
                                 format, named so that no loader globbing *.safetensors reads it)
        layers.ggml              the GGUF's layer weights stored as Q4_1, Q5_0 or Q8_0, by module name (the same)
        costeer_cache.json       build record: file sizes, timings, versions, how to load it

Later starts load that folder (a second or two: see ``FAST_LOAD``). The folder is also what a
vLLM server loads (``costeer models path smollm2`` prints it).

``<cache>`` is ``--model-cache`` / ``--cache-dir``, else ``$COSTEER_MODEL_CACHE``, else the
platform's cache directory (``$XDG_CACHE_HOME/costeer/models``, ``~/.cache/costeer/models``).
The entry name holds the GGUF file's sha256 (remembered per path, size, mtime and inode in
``<cache>/gguf_sha256.json``) and the versions of the libraries that produce the tensors, so a
changed file or an upgrade builds a new entry. An entry is written in a temporary folder beside it
and renamed into place under an exclusive lock (``fcntl.flock``): concurrent first starts build it
once, the others wait and load it. Before the rename the entry is loaded back and checked against
the GGUF model (same tokenization, bit-identical logits on a probe). An entry that is incomplete
or damaged (missing file, wrong size, bad JSON, bad safetensors header, fails to load) is rebuilt
after a one-line message on stderr. Everything is read with ``local_files_only=True``.

The head's Q8_0 blocks (34 bytes per 32 weights, exactly the float32 head's values: recovered from
them and checked at the build, ``costeer_kernels.q8_0.exact_q8_0``) are attached to the loaded
model's output layer (``costeer.fast_linear.attach_q8_0``): its few-row products and the steering
delta read 30 MB instead of 113 MB for SmolLM2, with the same result bit for bit. So are the blocks
of the layers' linear weights stored as Q4_1, Q5_0 or Q8_0 (20-34 bytes per 32 weights,
``costeer_kernels.blocks.exact_blocks``; ``attach_blocks``): a decode step of SmolLM2 reads
61 MB of layer weights instead of 390 MB. Layers stored as Q4_K or Q6_K (18 or 26.25 bytes per
32; Gemma 3 270M's attention outputs and some MLP down projections) cannot be recovered from
their values: their blocks are read from the GGUF file and kept where they de-quantize to the
layer's float32 weight bit for bit. The float32 weights stay in model.safetensors for
everything else (prefill, vLLM, other dtypes).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import hashlib
import json
import os
import re
import shutil
import struct
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

FORMAT_VERSION = 5  # 2: the build record says how the entry is loaded ("load"); 3: lm_head.q8_0; 4: layers.ggml;
# 5: layers.ggml also holds Q4_K / Q6_K layers (read from the GGUF file)
ENV_VAR = "COSTEER_MODEL_CACHE"
WEIGHTS_FILE = "model.safetensors"
HEAD_Q8_0_FILE = "lm_head.q8_0"
LAYERS_FILE = "layers.ggml"
INFO_FILE = "costeer_cache.json"
HASHES_FILE = "gguf_sha256.json"
# Text tokenized and run through both models when an entry is checked before it is committed.
PROBE_TEXT = "Hello! The café on 5th Street sells tea for 3.50 € — naïve 日本語 test.\n"


class ModelCacheError(RuntimeError):
    """A freshly built cache entry does not reproduce the GGUF model (a defect, not bad input)."""


@dataclass(frozen=True)
class CacheEntry:
    """Where a GGUF model's cache entry lives (whether or not it is built yet)."""

    name: str  # alias or GGUF file stem
    gguf: Path
    sha256: str  # of the GGUF file
    path: Path  # the entry folder

    @property
    def root(self) -> Path:
        return self.path.parent


def _say(msg: str) -> None:
    print(f"[costeer] {msg}", file=sys.stderr, flush=True)


def default_cache_dir() -> Path:
    """The platform's user cache folder for costeer models (ignores ``$COSTEER_MODEL_CACHE``)."""
    if sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    elif os.name == "nt":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "costeer" / "models"


def cache_root(cache_dir: Optional[os.PathLike | str] = None) -> Path:
    """The cache folder in use: ``cache_dir``, else ``$COSTEER_MODEL_CACHE``, else the default."""
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        raise TypeError(f"cache_dir must be a path (str or os.PathLike) or None, got {type(cache_dir).__name__}")
    chosen = cache_dir if cache_dir is not None else os.environ.get(ENV_VAR) or None
    if chosen is not None and not str(chosen).strip():
        raise ValueError(f"cache_dir must be a non-empty path (from the argument or ${ENV_VAR})")
    return Path(chosen).expanduser().absolute() if chosen is not None else default_cache_dir()


def library_versions() -> Dict[str, str]:
    """The versions (major.minor) that change what a build writes; part of every entry's name."""
    from importlib.metadata import version

    def major_minor(pkg: str) -> str:
        return ".".join(version(pkg).split(".")[:2])

    return {"transformers": major_minor("transformers"), "gguf": major_minor("gguf"), "format": str(FORMAT_VERSION)}


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def gguf_sha256(gguf: os.PathLike | str, cache_dir: Optional[os.PathLike | str] = None) -> str:
    """sha256 of a GGUF file, remembered in the cache folder per (path, size, mtime, inode)."""
    gguf = Path(gguf).resolve()
    st = gguf.stat()
    stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
    table_path = cache_root(cache_dir) / HASHES_FILE
    try:
        table = _read_json(table_path)
        if not isinstance(table, dict):
            table = {}
    except (OSError, ValueError):
        table = {}
    hit = table.get(str(gguf))
    if isinstance(hit, dict) and hit.get("stat") == stamp and isinstance(hit.get("sha256"), str):
        return hit["sha256"]
    digest = hashlib.sha256()
    with open(gguf, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    table[str(gguf)] = {"stat": stamp, "sha256": digest.hexdigest()}
    try:
        table_path.parent.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(table_path, table)
    except OSError:
        pass  # a read-only cache folder: the hash is computed again next time, nothing else changes
    return digest.hexdigest()


def entry_for_gguf(gguf: os.PathLike | str, name: str, cache_dir: Optional[os.PathLike | str] = None) -> CacheEntry:
    """The cache entry (built or not) of a GGUF file, named ``name`` in listings."""
    gguf = Path(gguf).resolve()
    sha = gguf_sha256(gguf, cache_dir)
    v = library_versions()
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"
    key = f"{safe}-{sha[:16]}-tf{v['transformers']}-gguf{v['gguf']}-v{v['format']}"
    return CacheEntry(name=name, gguf=gguf, sha256=sha, path=cache_root(cache_dir) / key)


def entry_for(spec: str, cache_dir: Optional[os.PathLike | str] = None) -> CacheEntry:
    """The cache entry of a model spec (an alias such as ``"smollm2"`` or a ``.gguf`` path)."""
    from .models import _cache_name, resolve_model

    where, gguf_file = resolve_model(spec)
    if gguf_file is None:
        raise ValueError(f"model {spec!r} is not a GGUF model (it is loaded from {where} as it is; "
                         f"the model cache holds de-quantized GGUF models only)")
    return entry_for_gguf(os.path.join(where, gguf_file), _cache_name(spec, gguf_file), cache_dir)


def _safetensors_problem(path: Path) -> Optional[str]:
    """Why a safetensors file is unreadable (header and length checked, no tensor read), or None."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{path.name} has no header"
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            return f"{path.name} has a bad header length"
        try:
            header = json.loads(f.read(n))
            end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return f"{path.name} has a bad header"
    if 8 + n + end != size:
        return f"{path.name} is {size} bytes, its header describes {8 + n + end}"
    return None


def check_entry(path: os.PathLike | str) -> Optional[str]:
    """Why the entry folder at ``path`` is not usable (``"missing"`` when absent), or None when it is.

    Checks, without loading tensors: the build record, every recorded file present with its recorded
    size, every small JSON file parsing, and the safetensors header matching the file length.
    """
    path = Path(path)
    if not path.is_dir():
        return "missing"
    try:
        info = _read_json(path / INFO_FILE)
        files = info["files"]
        if info.get("format") != FORMAT_VERSION or not isinstance(files, dict) or WEIGHTS_FILE not in files:
            return f"{INFO_FILE} is from another cache format"
    except FileNotFoundError:
        return f"{INFO_FILE} is missing (not written by the model cache, or damaged)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{INFO_FILE} is unreadable ({type(exc).__name__})"
    for rel, size in files.items():
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != size:
            return f"{rel} is {f.stat().st_size} bytes, expected {size}"
        if rel.endswith(".json") and rel != "tokenizer.json" and f.stat().st_size < 10_000_000:
            try:
                _read_json(f)
            except (OSError, ValueError):
                return f"{rel} is not valid JSON"
    for rel in (WEIGHTS_FILE, HEAD_Q8_0_FILE, LAYERS_FILE):
        problem = _safetensors_problem(path / rel) if rel in files else None
        if problem:
            return problem
    return None


def entry_info(path: os.PathLike | str) -> Optional[Dict[str, Any]]:
    """The build record of an entry folder (sizes, timings, versions), or None when unreadable."""
    try:
        info = _read_json(Path(path) / INFO_FILE)
        return info if isinstance(info, dict) else None
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _exclusive(lock_path: Path, name: str, progress: bool) -> Iterator[None]:
    import fcntl

    with open(lock_path, "a+b") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                _say(f"{name}: another process is building its model cache entry; waiting for it")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _transformers_bars_off() -> Iterator[None]:
    """The build shows one bar over its steps; transformers' per-file bars would interleave with it (its
    GGUF de-quantizing bar stays: it shows progress within the longest step)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


# The build record's "load" entry says how a warm start reads the folder, and the build checked that
# way against the GGUF model before committing the entry:
#   tokenizer "tokenizer.json": TokenizersBackend (PreTrainedTokenizerFast) straight from tokenizer.json
#     and tokenizer_config.json, plus the recorded padding/truncation sides. AutoTokenizer would
#     import the model's config module, parse the whole tokenizer.json in Python once more (33 MB for
#     Gemma 3) and, for a class such as GemmaTokenizer, rebuild the BPE model from it: 0.2 s instead of
#     1.4 s (SmolLM2) and 1.1 s instead of 4.3 s (Gemma 3 270M) on 2 cores.
#   model "safetensors": the architecture built from config.json with empty (meta) parameters, the
#     safetensors file memory-mapped and assigned to them, the tied weights tied again: 0.3 s, where
#     from_pretrained first compiles its checkpoint-conversion rules for every architecture.
#   "from_pretrained" (either part): the generic transformers path, used when the fast one does not
#     reproduce the GGUF model.
FAST_LOAD = {"tokenizer": "tokenizer.json", "model": "safetensors"}
_TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}


def _tokenizer_from_json(path: Path, spec: Dict[str, Any]):
    """The tokenizer from tokenizer.json + tokenizer_config.json (+ chat_template.jinja), no AutoTokenizer."""
    from transformers import PreTrainedTokenizerFast

    kwargs = _read_json(path / "tokenizer_config.json")
    kwargs.pop("tokenizer_class", None)
    template = path / "chat_template.jinja"
    if template.is_file():
        kwargs["chat_template"] = template.read_text(encoding="utf-8")
    for side in ("padding_side", "truncation_side"):
        if spec.get(side):
            kwargs[side] = spec[side]
    return PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), name_or_path=str(path), **kwargs)


def _no_init_weights():
    """transformers' context that skips weight initialization while a model is built to be loaded
    (``from_pretrained`` uses it the same way); a no-op where this transformers has none."""
    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights  # transformers 4
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def _model_from_safetensors(path: Path):
    """The model built empty from config.json, its weights assigned from the memory-mapped safetensors file."""
    import itertools

    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    # Parameters on the meta device; buffers (RoPE tables, Gemma's embedding scale) computed by the
    # constructors as usual. ``no_init_weights`` skips the random initialization of the parameters
    # (every one is assigned from the file below, and one left on meta stops the load): on meta
    # tensors it costs nothing numerically but runs torch's Python reference kernels for each of
    # them, about 0.3 s for SmolLM2 on 2 cores. Buffers come out identical either way
    # (tests/costeer/test_model_cache.py compares every tensor with from_pretrained's).
    with init_empty_weights(), _no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(load_file(str(path / WEIGHTS_FILE)), strict=False, assign=True)
    model.tie_weights()  # the assigned embedding replaced the one lm_head was tied to
    empty = [n for n, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if result.unexpected_keys or empty:
        raise ModelCacheError(f"{path.name}: {WEIGHTS_FILE} does not fit the architecture (unexpected "
                              f"{result.unexpected_keys[:3]}, not loaded {empty[:3]})")
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(path), local_files_only=True)
    model.config._name_or_path = str(path)
    return model.eval()


def _load_folder(path: Path, dtype=None, tokenizer_only: bool = False,
                 load: Optional[Dict[str, Any]] = None) -> Tuple[Any, Any]:
    """``(model, tokenizer)`` of an entry folder, read as its build record's ``load`` entry says
    (``load``: that entry; None: read the record; no entry: the generic from_pretrained path)."""
    import torch

    if load is None:
        load = (entry_info(path) or {}).get("load") or {}
    tok_spec = load.get("tokenizer") or {}
    if tok_spec.get("loader") == FAST_LOAD["tokenizer"]:
        tokenizer = _tokenizer_from_json(path, tok_spec)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tokenizer_only:
        return None, tokenizer
    if load.get("model") == FAST_LOAD["model"]:
        model = _model_from_safetensors(path)
        if dtype is not None and dtype != torch.float32:
            model = model.to(dtype)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=dtype or torch.float32)
    if (path / HEAD_Q8_0_FILE).is_file() and model.dtype == torch.float32:
        from safetensors.torch import load_file

        from .fast_linear import attach_q8_0

        head, blocks = model.get_output_embeddings(), load_file(str(path / HEAD_Q8_0_FILE))["weight"]
        attach_q8_0(head, blocks)
        _check_blocks(path, HEAD_Q8_0_FILE, "lm_head", head, blocks)
    if (path / LAYERS_FILE).is_file() and model.dtype == torch.float32:  # Q4_1, Q5_0, Q8_0: by bytes per row
        from safetensors.torch import load_file

        from .fast_linear import attach_blocks

        modules = dict(model.named_modules())
        for name, blocks in load_file(str(path / LAYERS_FILE)).items():
            mod = modules.get(name)
            if type(mod) is not torch.nn.Linear:
                raise ModelCacheError(f"{path.name}: {LAYERS_FILE} names {name!r}, not a linear layer of the model")
            attach_blocks(mod, blocks)
            _check_blocks(path, LAYERS_FILE, name, mod, blocks)
    return model, tokenizer


def _check_blocks(path: Path, file: str, name: str, mod, blocks) -> None:
    """The blocks attached to ``mod``: their first and last rows de-quantize to the layer's float32 weight, bit for
    bit (a few microseconds a layer; the build verified every value): a blocks file that does not
    belong to the weights beside it stops the load (and the entry is rebuilt)."""
    import torch

    from costeer_kernels.blocks import dequantize_blocks

    w = mod.weight.detach()
    for r in {0, w.shape[0] - 1}:
        row = dequantize_blocks(blocks[r:r + 1], w.shape[1])
        if not torch.equal(row.view(torch.int32), w[r:r + 1].view(torch.int32)):
            raise ModelCacheError(f"{path.name}: {file}: the blocks of {name} (row {r}) are not the float32 weight's")


def _head_q8_0(model) -> Tuple[Optional[Any], str]:
    """The loaded model's vocabulary head as Q8_0 blocks [V, H / 32 * 34] uint8 when its float32
    values are exactly Q8_0's (a GGUF head stored as Q8_0: the file's own blocks, recovered from the
    values without parsing the file again), else None; and what was found."""
    import torch

    from costeer_kernels.q8_0 import exact_q8_0

    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.weight.dtype != torch.float32:
        return None, "the output layer is not a float32 nn.Linear"
    blocks = exact_q8_0(head.weight)
    return (blocks, "Q8_0") if blocks is not None else (None, "the head's values are not exactly Q8_0 blocks")


def _layer_blocks(model, gguf_path: Optional[Path] = None) -> Tuple[Dict[str, Any], str]:
    """The GGML blocks (uint8, ``costeer_kernels.blocks``) of every float32 ``nn.Linear`` below the
    output layer, by module name, and what was found: Q4_1, Q5_0 or Q8_0 where its values are
    exactly such blocks (a GGUF layer stored so: the file's own blocks, recovered from the values),
    else Q4_K or Q6_K as stored in ``gguf_path`` (not recoverable from values: read from the file,
    ``_gguf_k_quants``) where they de-quantize to the layer's weight bit for bit."""
    import torch

    from costeer_kernels.blocks import FORMATS, exact_blocks

    head = model.get_output_embeddings()
    linears = [(n, m) for n, m in model.named_modules() if type(m) is torch.nn.Linear and m is not head
               and m.weight.dtype == torch.float32]
    found, count = {}, dict.fromkeys(FORMATS, 0)
    for name, mod in linears:
        got = exact_blocks(mod.weight)
        if got is not None:
            count[got[0]] += 1
            found[name] = got[1]
    rest = [(n, m) for n, m in linears if n not in found]
    if rest and gguf_path is not None:
        for name, (fmt, blocks) in _gguf_k_quants(gguf_path, model, rest).items():
            count[fmt] += 1
            found[name] = blocks
    kinds = ", ".join(f"{n} {fmt.upper()}" for fmt, n in count.items() if n)
    return found, f"{kinds or 'none'} of {len(linears)} linear layers"


# GGUF metadata value types (gguf-py's GGUFValueType) -> fixed byte size; 8 = string, 9 = array.
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _gguf_tensor_index(path: Path) -> Tuple[Dict[str, Tuple[int, Tuple[int, ...], int]], str, Any]:
    """{tensor name: (GGML type, dims, absolute byte offset)} of a GGUF file (v2/v3), its
    ``general.architecture`` and its read-only memory map. gguf-py's ``GGUFReader`` builds a memory-mapped view of every metadata
    element first (Gemma 3 270M's 262144-token vocabulary: 14 s on a 2-core machine); this walks
    the metadata by sizes only (0.1 s). Whatever it returns is checked before use: the blocks read
    at an offset must de-quantize to the loaded layer's weight bit for bit."""
    import mmap

    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    pos = 0

    def take(fmt: str):
        nonlocal pos
        vals = struct.unpack_from("<" + fmt, mm, pos)
        pos += struct.calcsize("<" + fmt)
        return vals if len(vals) > 1 else vals[0]

    def string() -> str:
        nonlocal pos
        n = take("Q")
        pos += n
        return bytes(mm[pos - n:pos]).decode("utf-8", "replace")

    def skip(vtype: int) -> None:
        nonlocal pos
        if vtype in _GGUF_SIZES:
            pos += _GGUF_SIZES[vtype]
        elif vtype == 8:
            n = take("Q")  # (not `pos += take(...)`: that adds to pos as it was before the length)
            pos += n
        elif vtype == 9:
            etype, count = take("IQ")
            if etype in _GGUF_SIZES:
                pos += count * _GGUF_SIZES[etype]
            else:
                for _ in range(count):
                    skip(etype)
        else:
            raise ValueError(f"unknown GGUF value type {vtype} at byte {pos}")

    if mm[:4] != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file")
    pos = 4
    version, n_tensors, n_kv = take("IQQ")
    if version < 2:
        raise ValueError(f"{path}: GGUF version {version} (2 or 3 expected)")
    alignment, arch = 32, ""
    for _ in range(n_kv):
        key, vtype = string(), take("I")
        if key == "general.alignment" and vtype == 4:
            alignment = take("I")
        elif key == "general.architecture" and vtype == 8:
            arch = string()
        else:
            skip(vtype)
    infos = []
    for _ in range(n_tensors):
        name, n_dims = string(), take("I")
        dims = tuple(take("Q") for _ in range(n_dims))
        ttype, offset = take("IQ")
        infos.append((name, ttype, dims, offset))
    start = (pos + alignment - 1) // alignment * alignment
    return {name: (ttype, dims, start + offset) for name, ttype, dims, offset in infos}, arch, mm


def _gguf_k_quants(gguf_path: Path, model, linears) -> Dict[str, Tuple[str, Any]]:
    """{module name: (format, blocks)} for those of ``linears`` stored as Q4_K or Q6_K in the GGUF
    file (names mapped by gguf-py's tensor-name map of the model's architecture) whose blocks
    de-quantize to the layer's float32 weight bit for bit; a file or architecture this cannot read
    gives none (the layers keep their float32 weights)."""
    import gguf

    kinds = {int(gguf.GGMLQuantizationType.Q4_K): "q4_k", int(gguf.GGMLQuantizationType.Q6_K): "q6_k"}
    try:
        index, arch_name, mm = _gguf_tensor_index(gguf_path)
        arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
        names = gguf.get_tensor_name_map(arch, model.config.num_hidden_layers)
    except (OSError, ValueError, struct.error, StopIteration, AttributeError, KeyError):
        return {}
    try:
        return _read_k_quants(index, mm, names, kinds, linears)
    finally:
        mm.close()  # every block read was copied out


def _read_k_quants(index, mm, names, kinds, linears) -> Dict[str, Tuple[str, Any]]:
    import numpy as np
    import torch

    from costeer_kernels._ggml import same_bits
    from costeer_kernels.blocks import FORMATS

    found = {}
    for name, mod in linears:
        gguf_name = names.get_name(name)
        info = index.get(f"{gguf_name}.weight") if gguf_name else None
        if info is None or info[0] not in kinds:
            continue
        fmt = kinds[info[0]]
        f = FORMATS[fmt]
        N, K = mod.weight.shape
        if info[1] != (K, N) or K % f.per:
            continue
        size = N * (K // f.per) * f.nbytes
        if info[2] + size > len(mm):
            continue
        blocks = torch.from_numpy(np.frombuffer(mm, dtype=np.uint8, count=size, offset=info[2]).copy()).reshape(N, -1)
        if same_bits(f.dequantize(blocks), mod.weight.detach()):
            found[name] = (fmt, blocks)
    return found


def _state_dict_untied(model) -> Tuple[Dict[str, Any], List[str]]:
    """Contiguous tensors to save, and the keys left out because they share another key's storage
    (a tied ``lm_head.weight``: transformers and vLLM re-tie it from ``tie_word_embeddings``)."""
    state: Dict[str, Any] = {}
    seen: Dict[Tuple, str] = {}
    dropped: List[str] = []
    for k, t in model.state_dict().items():
        where = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if where in seen:
            dropped.append(k)
            continue
        seen[where] = k
        state[k] = t.detach().contiguous()
    return state, dropped


def _fsync_tree(folder: Path) -> None:
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_entry(tmp: Path, model, tokenizer, head_q8_0=None, layer_blocks=None) -> Tuple[Dict[str, int], List[str]]:
    import torch
    from safetensors.torch import save_file

    tmp.mkdir(parents=True)
    tokenizer.save_pretrained(str(tmp))
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are plain float32 now
    config.architectures = [type(model).__name__]
    config.dtype = torch.float32
    config.save_pretrained(str(tmp))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(tmp))
    state, tied = _state_dict_untied(model)
    save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    if head_q8_0 is not None:
        save_file({"weight": head_q8_0}, str(tmp / HEAD_Q8_0_FILE), metadata={"format": "ggml-q8_0"})
    if layer_blocks:
        save_file(layer_blocks, str(tmp / LAYERS_FILE), metadata={"format": "ggml-q4_1-q5_0-q8_0-q4_k-q6_k"})
    _fsync_tree(tmp)
    return {f.name: f.stat().st_size for f in sorted(tmp.iterdir())}, tied


# Extra texts for the tokenizer comparison: special tokens written out, whitespace runs, a chat turn.
_TOKENIZER_PROBES = (PROBE_TEXT, "  two  spaces\n\n\ttab  ", "<|im_start|>user\nHi<|im_end|>\n",
                     "<bos><eos><pad><unk><mask><start_of_turn>user\nHi<end_of_turn>\n")


def _tokenizer_differences(tokenizer, tokenizer2) -> List[str]:
    """How ``tokenizer2`` (read from the folder) behaves differently from ``tokenizer`` (the GGUF one)."""
    problems = []
    for text in _TOKENIZER_PROBES:
        for special in (True, False):
            ids = tokenizer(text, add_special_tokens=special)["input_ids"]
            if tokenizer2(text, add_special_tokens=special)["input_ids"] != ids:
                problems.append("tokenization differs")
            elif any(tokenizer2.decode(ids, skip_special_tokens=skip) != tokenizer.decode(ids, skip_special_tokens=skip)
                     for skip in (True, False)):
                problems.append("decoding differs")
    if len(tokenizer2) != len(tokenizer) or tokenizer2.get_vocab() != tokenizer.get_vocab():
        problems.append("vocabulary differs")
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "all_special_ids", "chat_template",
                 "padding_side", "truncation_side", "model_max_length"):
        if getattr(tokenizer, attr, None) != getattr(tokenizer2, attr, None):
            problems.append(f"{attr} differs")
    if getattr(tokenizer, "chat_template", None):
        turn = [{"role": "user", "content": "Hi"}]
        if (tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
                != tokenizer2.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)):
            problems.append("chat template output differs")
    return sorted(set(problems))


def _logits_differ(tokenizer, model, model2) -> bool:
    import torch

    with torch.no_grad():
        x = torch.tensor([tokenizer.encode(PROBE_TEXT)[:24]])
        a, b = model(x).logits, model2(x).logits
    return a.shape != b.shape or not torch.equal(a, b)


def _check_same(name: str, model, tokenizer, folder: Path, load: Dict[str, Any]) -> Tuple[Any, Any, float]:
    """The folder loaded back as ``load`` says, compared with the GGUF model; a fast loader that does
    not reproduce it is replaced by from_pretrained in ``load`` (updated in place). Returns the
    loaded ``(model, tokenizer)`` and the seconds the first load took (what the next start pays)."""
    t = time.perf_counter()
    try:
        model2, tokenizer2 = _load_folder(folder, load=load)
    except Exception:  # noqa: BLE001 - a fast loader that cannot read this folder: the generic path
        load["tokenizer"]["loader"] = load["model"] = "from_pretrained"
        t = time.perf_counter()
        model2, tokenizer2 = _load_folder(folder, load=load)
    load_s = time.perf_counter() - t
    problems = _tokenizer_differences(tokenizer, tokenizer2)
    if problems and load["tokenizer"]["loader"] != "from_pretrained":
        load["tokenizer"]["loader"] = "from_pretrained"
        tokenizer2 = _load_folder(folder, tokenizer_only=True, load=load)[1]
        problems = _tokenizer_differences(tokenizer, tokenizer2)
    if not problems and _logits_differ(tokenizer, model, model2) and load["model"] != "from_pretrained":
        load["model"] = "from_pretrained"
        model2 = _load_folder(folder, load=load)[0]
    if _logits_differ(tokenizer, model, model2):
        problems.append("logits differ")
    if problems:
        raise ModelCacheError(f"{name}: the rebuilt folder does not reproduce the GGUF model ({', '.join(problems)}); "
                              f"nothing was cached. This is a defect: please report it with `costeer models` output.")
    return model2.eval(), tokenizer2, load_s


def _build(entry: CacheEntry, progress: bool) -> Tuple[Any, Any]:
    """De-quantize, write, check and commit an entry (caller holds its lock); returns the loaded folder."""
    from tqdm.auto import tqdm

    from .models import ModelNotFoundError
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import torch

    t0 = time.perf_counter()
    if progress:
        _say(f"{entry.name}: first use: de-quantizing {entry.gguf.name} ({entry.gguf.stat().st_size / 1e6:.0f} MB) "
             f"once into {entry.path} (later starts load that folder)")
    for old in entry.root.glob(f".tmp-{entry.path.name}-*"):  # left by a build that was killed
        shutil.rmtree(old, ignore_errors=True)
    tmp = entry.root / f".tmp-{entry.path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    bar = tqdm(total=4, unit="step", file=sys.stderr, disable=not progress,
               bar_format="{desc} {n_fmt}/{total_fmt} |{bar}| {elapsed}", dynamic_ncols=True)

    def step(what: str) -> None:
        bar.set_description_str(f"[costeer] caching {entry.name}: {what:<20}")

    timings: Dict[str, float] = {}
    try:
        with _transformers_bars_off():
            t = time.perf_counter()
            step("tokenizer from GGUF")
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(entry.gguf.parent), gguf_file=entry.gguf.name,
                                                          local_files_only=True)
                timings["tokenizer_s"] = time.perf_counter() - t
                bar.update()
                t = time.perf_counter()
                step("de-quantizing weights")
                model = AutoModelForCausalLM.from_pretrained(str(entry.gguf.parent), gguf_file=entry.gguf.name,
                                                             local_files_only=True, dtype=torch.float32).eval()
            except (OSError, ValueError, KeyError) as exc:
                raise ModelNotFoundError(f"model {entry.name!r}: the GGUF file {entry.gguf} could not be loaded: "
                                         f"{str(exc).rstrip('.')}") from None
            timings["dequantize_s"] = time.perf_counter() - t
            bar.update()
            t = time.perf_counter()
            step("writing safetensors")
            head_q8_0, head_note = _head_q8_0(model)
            layer_blocks, layers_note = _layer_blocks(model, entry.gguf)
            files, tied = _write_entry(tmp, model, tokenizer, head_q8_0, layer_blocks)
            timings["write_s"] = time.perf_counter() - t
            bar.update()
            step("checking the folder")
            extra = {f.name for f in tmp.iterdir()} - _TOKENIZER_FILES - {WEIGHTS_FILE, HEAD_Q8_0_FILE, LAYERS_FILE, "config.json",
                                                                         "generation_config.json"}
            load = {"tokenizer": {"loader": FAST_LOAD["tokenizer"] if not extra else "from_pretrained",
                                  "class": type(tokenizer).__name__, "padding_side": tokenizer.padding_side,
                                  "truncation_side": tokenizer.truncation_side},
                    "model": FAST_LOAD["model"]}
            model2, tokenizer2, timings["load_s"] = _check_same(entry.name, model.eval(), tokenizer, tmp, load)
            bar.update()
        del model
        timings["build_s"] = time.perf_counter() - t0
        info = {
            "format": FORMAT_VERSION, "name": entry.name, "gguf": str(entry.gguf), "gguf_sha256": entry.sha256,
            "versions": library_versions(), "architecture": model2.config.architectures[0],
            "tied_keys_left_out": tied, "head_q8_0": head_note, "layer_blocks": layers_note, "load": load, "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_id": uuid.uuid4().hex, "timings": {k: round(v, 3) for k, v in timings.items()}, "files": files,
        }
        _write_json_atomic(tmp / INFO_FILE, info)
        if entry.path.exists():  # a damaged entry: moved aside first, so the rename below is atomic
            trash = entry.root / f".trash-{entry.path.name}-{uuid.uuid4().hex[:8]}"
            os.rename(entry.path, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.rename(tmp, entry.path)
    finally:
        bar.close()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    model2.config._name_or_path = str(entry.path)
    if progress:
        size = sum(files.values()) / 1e6
        _say(f"{entry.name}: cached ({size:.0f} MB) in {timings['build_s']:.1f} s; the next start loads it in about "
             f"{timings['load_s']:.1f} s (measured now) instead of de-quantizing again")
    return model2, tokenizer2


def _direct(entry: CacheEntry, dtype, tokenizer_only: bool) -> Tuple[Any, Any]:
    """The GGUF file loaded without the cache (the cache folder cannot be written)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=entry.gguf.name, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(entry.gguf.parent), **kw)
    if tokenizer_only:
        return None, tokenizer
    return AutoModelForCausalLM.from_pretrained(str(entry.gguf.parent), dtype=dtype or torch.float32, **kw), tokenizer


def _ensure(entry: CacheEntry, *, dtype=None, tokenizer_only: bool = False, load: bool = True,
            progress: bool = True) -> Tuple[Any, Any]:
    """Load the entry, building or rebuilding it first when needed. ``load=False`` only makes sure it exists."""
    problem = check_entry(entry.path)
    failed_build = None
    if problem is None:
        if not load:
            return None, None
        try:
            return _load_folder(entry.path, dtype, tokenizer_only)
        except Exception as exc:  # noqa: BLE001 - any failure to load a cached folder means: rebuild it
            problem = f"it does not load: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            failed_build = (entry_info(entry.path) or {}).get("build_id")
    if problem != "missing":
        _say(f"{entry.name}: the model cache entry {entry.path} is damaged ({problem}); rebuilding it")
    with contextlib.ExitStack() as held:
        try:
            entry.root.mkdir(parents=True, exist_ok=True)
            held.enter_context(_exclusive(entry.root / f".{entry.path.name}.lock", entry.name, progress))
        except OSError as exc:
            _say(f"{entry.name}: cannot use the model cache folder {entry.root} ({exc}); loading the GGUF file "
                 f"directly (slow); set ${ENV_VAR} or --model-cache to a writable folder for fast starts")
            return _direct(entry, dtype, tokenizer_only)
        # Another process may have built it while this one waited for the lock.
        if check_entry(entry.path) is None and (failed_build is None
                                                or (entry_info(entry.path) or {}).get("build_id") != failed_build):
            built = None
        else:
            try:
                built = _build(entry, progress)
            except OSError as exc:
                _say(f"{entry.name}: cannot write the model cache entry {entry.path} ({exc}); loading the GGUF "
                     f"file directly (slow)")
                return _direct(entry, dtype, tokenizer_only)
    if built is None:
        return _load_folder(entry.path, dtype, tokenizer_only) if load else (None, None)
    if not gc.isenabled():
        # The start-up pauses the collector and then freezes what is alive (costeer/startup.py):
        # a reference cycle among what the build dropped (the GGUF-loaded model) is freed now,
        # not frozen for the process's life. About 0.5 s, once, on a build of 20 s or more.
        gc.collect()
    model, tokenizer = built
    if dtype is not None and model.dtype != dtype:
        model = model.to(dtype)
    return (None if tokenizer_only else model), tokenizer


def cached_model_dir(spec: str, cache_dir: Optional[os.PathLike | str] = None, progress: bool = True) -> Path:
    """The cache folder of a GGUF model spec (alias or ``.gguf`` path), built first if needed.

    The folder holds ``model.safetensors``, ``config.json`` (no ``quantization_config``,
    ``architectures`` set) and the tokenizer files: what ``from_pretrained`` and a vLLM server load.

    Parameters
    ----------
    spec : str
        ``"smollm2"``, ``"gemma3-270m"`` or a path to a ``.gguf`` file.
    cache_dir : path, optional
        Cache folder; default ``$COSTEER_MODEL_CACHE`` or the platform's user cache folder.
    progress : bool
        Report a first build on stderr (what it does, a progress bar, the next start's time).

    Returns
    -------
    pathlib.Path
        The entry folder.
    """
    entry = entry_for(spec, cache_dir)
    _ensure(entry, load=False, progress=progress)
    return entry.path


def load_cached(gguf: os.PathLike | str, name: str, dtype=None, cache_dir: Optional[os.PathLike | str] = None,
                progress: bool = True) -> Tuple[Any, Any]:
    """``(model, tokenizer)`` of a GGUF file through its cache entry (built on first use)."""
    return _ensure(entry_for_gguf(gguf, name, cache_dir), dtype=dtype, progress=progress)


def load_cached_tokenizer(gguf: os.PathLike | str, name: str, cache_dir: Optional[os.PathLike | str] = None,
                          progress: bool = True):
    """The tokenizer of a GGUF file through its cache entry (built on first use, weights included)."""
    return _ensure(entry_for_gguf(gguf, name, cache_dir), tokenizer_only=True, progress=progress)[1]


def list_entries(cache_dir: Optional[os.PathLike | str] = None) -> List[Dict[str, Any]]:
    """Every entry folder in the cache: ``path``, ``name``, ``size`` (bytes), ``problem`` and its build record."""
    root = cache_root(cache_dir)
    out = []
    if not root.is_dir():
        return out
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        info = entry_info(d) or {}
        size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        name = info.get("name") or re.sub(r"-[0-9a-f]{16}-tf.*$", "", d.name)
        out.append({"path": d, "name": name, "size": size,
                    "problem": check_entry(d), "info": info})
    return out


def remove_entries(name: str, cache_dir: Optional[os.PathLike | str] = None) -> List[Path]:
    """Delete every entry of ``name`` (an alias or GGUF stem; ``"all"``: every entry); returns the removed folders."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError("name must be a non-empty string (an alias, a GGUF file stem or 'all')")
    removed = []
    for e in list_entries(cache_dir):
        if name == "all" or e["name"].lower() == name.strip().lower() or e["path"].name == name:
            trash = e["path"].with_name(f".trash-{e['path'].name}-{uuid.uuid4().hex[:8]}")
            os.rename(e["path"], trash)  # atomic: a concurrent start sees the entry or nothing
            shutil.rmtree(trash, ignore_errors=True)
            removed.append(e["path"])
    return removed


def _mb(n: int) -> str:
    return f"{n / 1e6:.0f} MB"


def main(argv: Optional[List[str]] = None) -> int:
    """``costeer models``: list, build (``path``/``build``) and remove model cache entries."""
    from .models import EMBEDDED, ModelNotFoundError

    ap = argparse.ArgumentParser(prog="costeer models", description="The model cache: GGUF models de-quantized once "
                                 "into folders (safetensors + config + tokenizer) that later starts and vLLM load.")
    ap.add_argument("--cache-dir", default=None, help=f"cache folder (default: ${ENV_VAR} or {default_cache_dir()})")
    sub = ap.add_subparsers(dest="action", metavar="{list,path,build,rm}")
    sub.add_parser("list", help="known aliases, whether and where each is cached, and its size (the default)")
    p = sub.add_parser("path", aliases=["build"], help="build the entry if needed and print its folder")
    p.add_argument("model", help="alias (smollm2, gemma3-270m) or path to a .gguf file")
    r = sub.add_parser("rm", help="delete the cached entries of a model (every version)")
    r.add_argument("model", help="alias or GGUF file stem, as `costeer models` lists it; 'all' for every entry")
    args = ap.parse_args(argv)
    try:
        root = cache_root(args.cache_dir)
        if args.action in ("path", "build"):
            print(cached_model_dir(args.model, root), flush=True)
            return 0
        if args.action == "rm":
            removed = remove_entries(args.model, root)
            if not removed:
                print(f"costeer: error: no cache entry of {args.model!r} in {root}", file=sys.stderr)
                return 1
            for d in removed:
                print(f"removed {d}")
            return 0
        entries = list_entries(root)
        print(f"model cache: {root}")
        current = set()
        rows = []
        for alias, emb in EMBEDDED.items():
            try:
                entry = entry_for(alias, root)
            except ModelNotFoundError:
                rows.append((alias, emb.description, f"not installed ({emb.install_hint})", "-", ""))
                continue
            current.add(entry.path)
            problem = check_entry(entry.path)
            if problem is None:
                e = next((e for e in entries if e["path"] == entry.path), None)
                load_s = ((e or {}).get("info", {}).get("timings", {}) or {}).get("load_s")
                status = "cached" + (f" (loads in ~{load_s:.1f} s)" if load_s is not None else "")
                rows.append((alias, emb.description, status, _mb(e["size"]) if e else "-", str(entry.path)))
            else:
                status = "not cached (built on first use)" if problem == "missing" else f"damaged: {problem}"
                rows.append((alias, emb.description, status, "-", ""))
        widths = [max(len(r[i]) for r in rows + [("ALIAS", "MODEL", "STATUS", "SIZE", "")]) for i in range(4)]
        for r in [("ALIAS", "MODEL", "STATUS", "SIZE", "PATH")] + rows:
            print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
        others = [e for e in entries if e["path"] not in current]
        if others:
            print("other entries (another GGUF file or library version; `costeer models rm NAME` deletes them):")
            for e in others:
                print(f"  {e['name']:<{widths[0]}}  {_mb(e['size']):>8}  {e['path']}"
                      + (f"  (not usable: {e['problem']})" if e["problem"] else ""))
        return 0
    except (ModelNotFoundError, ValueError, TypeError, ModelCacheError, OSError) as exc:
        print(f"costeer: error: {exc}", file=sys.stderr)
        return 2
