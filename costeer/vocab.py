"""Vocabulary maps between a cloud LLM and a small model with different tokenizers.

``build_vocab_map(llm_tokenizer, slm_tokenizer)`` matches tokens by the text (bytes) they stand
for, after undoing each vocabulary's encoding of spaces and bytes:

- byte-level BPE (GPT-2, Qwen, Llama 3, SmolLM): every byte is one printable unicode character
  ("Ġ" is the space, "Ċ" the newline, ...); decoded through the inverse byte-to-unicode table;
- SentencePiece (Llama 2, Mistral, Gemma): "▁" is the space, ``<0xNN>`` tokens are raw bytes
  (byte fallback), everything else is UTF-8 text;
- anything else: the token string as UTF-8.

Special tokens (added tokens marked special, e.g. ``<|endoftext|>``, ``<s>``) match only a
special token with the same string. The result is a :class:`VocabMap`, which
``costeer_kernels.steer`` / ``steer_from_hidden`` take as ``vocab_map=``: the kernels gather the
small model's values through it (no remapped copy of any [B, V] row).
"""
from __future__ import annotations

import re
import weakref
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Tuple

import torch

SCHEMES = ("byte_level", "sentencepiece", "plain")
_SP_SPACE = "\u2581"  # ▁
_SP_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_BYTE_ENCODER = _bytes_to_unicode()
_BYTE_DECODER = {c: b for b, c in _BYTE_ENCODER.items()}


def normalize_token(token: str, scheme: str) -> Optional[bytes]:
    """The bytes a token stands for under ``scheme``; None when it cannot be decoded."""
    if scheme == "byte_level":
        try:
            return bytes(_BYTE_DECODER[ch] for ch in token)
        except KeyError:
            return None
    if scheme == "sentencepiece":
        m = _SP_BYTE.match(token)
        if m:
            return bytes([int(m.group(1), 16)])
        return token.replace(_SP_SPACE, " ").encode("utf-8")
    if scheme == "plain":
        return token.encode("utf-8")
    raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")


@dataclass
class VocabMap:
    """LLM token id -> small-model token id.

    ``slm_index``: int32 tensor [llm_size]; -1 where the LLM token has no counterpart.
    ``matched`` / ``llm_only`` / ``slm_only``: coverage counts (LLM tokens with a counterpart,
    without one, and small-model tokens no LLM token maps to).
    """

    slm_index: torch.Tensor
    slm_size: int
    llm_scheme: str = "plain"
    slm_scheme: str = "plain"
    matched: int = field(init=False)
    llm_only: int = field(init=False)
    slm_only: int = field(init=False)
    _on_device: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        idx = self.slm_index
        if not isinstance(idx, torch.Tensor):
            raise TypeError(f"slm_index must be a torch.Tensor, got {type(idx).__name__}")
        if idx.dtype.is_floating_point or idx.dtype == torch.bool or idx.is_complex():
            raise TypeError(f"slm_index must hold integers, got {idx.dtype}")
        if idx.dim() != 1:
            raise ValueError(f"slm_index must be 1-D [V_llm], got shape {tuple(idx.shape)}")
        if isinstance(self.slm_size, bool) or not isinstance(self.slm_size, int) or self.slm_size < 1:
            raise ValueError(f"slm_size must be an int >= 1, got {self.slm_size!r}")
        cpu = idx.detach().to("cpu", torch.int64)
        if cpu.numel():
            lo, hi = int(cpu.min()), int(cpu.max())
            if lo < -1 or hi >= self.slm_size:
                bad = lo if lo < -1 else hi
                raise ValueError(
                    f"slm_index has an out-of-range entry {bad}: entries must be -1 (no counterpart) or in "
                    f"[0, {self.slm_size})"
                )
        self.slm_index = cpu.to(torch.int32).contiguous()
        mapped = self.slm_index >= 0
        self.matched = int(mapped.sum())
        self.llm_only = int(self.slm_index.numel() - self.matched)
        hit = torch.zeros(self.slm_size, dtype=torch.bool)
        hit[self.slm_index[mapped].long()] = True
        self.slm_only = int(self.slm_size - int(hit.sum()))

    @property
    def llm_size(self) -> int:
        return int(self.slm_index.numel())

    @property
    def coverage(self) -> dict:
        """Counts and fractions: matched, llm_only, slm_only, llm_coverage, slm_coverage."""
        return {
            "llm_size": self.llm_size,
            "slm_size": self.slm_size,
            "matched": self.matched,
            "llm_only": self.llm_only,
            "slm_only": self.slm_only,
            "llm_coverage": self.matched / max(1, self.llm_size),
            "slm_coverage": (self.slm_size - self.slm_only) / self.slm_size,
        }

    def index_on(self, device) -> torch.Tensor:
        """``slm_index`` on ``device`` (copied once per device, then cached)."""
        device = torch.device(device)
        if device.type == "cpu":
            return self.slm_index
        key = str(device)
        t = self._on_device.get(key)
        if t is None:
            t = self.slm_index.to(device)
            self._on_device[key] = t
        return t

    def padded(self, llm_width: int) -> "VocabMap":
        """The map extended with -1 (no counterpart) to ``llm_width`` LLM ids (padded logit rows)."""
        if llm_width < self.llm_size:
            raise ValueError(f"llm_width={llm_width} is smaller than the map ({self.llm_size} LLM tokens)")
        idx = torch.full((llm_width,), -1, dtype=torch.int32)
        idx[: self.llm_size] = self.slm_index
        return VocabMap(idx, self.slm_size, self.llm_scheme, self.slm_scheme)

    def __repr__(self) -> str:
        return (f"VocabMap(llm_size={self.llm_size}, slm_size={self.slm_size}, matched={self.matched}, "
                f"llm_only={self.llm_only}, slm_only={self.slm_only}, schemes=({self.llm_scheme}, {self.slm_scheme}))")


# _vocab_and_specials per tokenizer object, with the tokenizer's length when it was read: a
# cross-tokenizer Generator asks for both vocabularies several times (the map, each side's token
# bytes, the largest ids), and reading a 262144-token vocabulary out of ``tokenizers`` costs ~0.2 s.
# Adding tokens changes the length, which invalidates the entry.
_VOCAB_MEMO: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _vocab_and_specials(tok) -> Tuple[Dict[str, int], set, object]:
    """({token: id}, {special token strings}, backend tokenizer or None) of any supported tokenizer
    (the same objects on later calls for the same, unchanged tokenizer: callers must not modify them)."""
    if isinstance(tok, Mapping):
        return dict(tok), set(), None
    try:
        size = len(tok)
        hit = _VOCAB_MEMO.get(tok)
    except TypeError:  # not sized or not weak-referenceable: read it every time
        return _read_vocab_and_specials(tok)
    if hit is not None and hit[0] == size:
        return hit[1]
    found = _read_vocab_and_specials(tok)
    _VOCAB_MEMO[tok] = (size, found)
    return found


def vocab_of(tok) -> Dict[str, int]:
    """``{token: id}`` of a tokenizer (read once per unchanged tokenizer object; do not modify it)."""
    return _vocab_and_specials(tok)[0]


def _read_vocab_and_specials(tok) -> Tuple[Dict[str, int], set, object]:
    backend = None
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover
        Tokenizer = None
    if Tokenizer is not None and isinstance(tok, Tokenizer):
        backend = tok
        vocab = tok.get_vocab(with_added_tokens=True)
        specials = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
        return vocab, specials, backend
    if hasattr(tok, "get_vocab"):
        vocab = tok.get_vocab()
        specials = set(getattr(tok, "all_special_tokens", []) or [])
        for t in (getattr(tok, "added_tokens_decoder", None) or {}).values():
            if getattr(t, "special", False):
                specials.add(getattr(t, "content", str(t)))
        backend = getattr(tok, "backend_tokenizer", None)
        return dict(vocab), specials, backend
    raise TypeError(
        f"tokenizer must be a tokenizers.Tokenizer, a transformers tokenizer or a {{token: id}} mapping, "
        f"got {type(tok).__name__}"
    )


def detect_scheme(vocab: Mapping[str, int], backend=None) -> str:
    """"byte_level", "sentencepiece" or "plain" from the tokenizer's decoder, else its tokens."""
    if backend is not None:
        try:
            import json

            # The decoder and pre-tokenizer alone: serializing the whole tokenizer (backend.to_str())
            # and parsing it back costs seconds for a 262144-token vocabulary (Gemma 3).
            def spec_of(component):
                return json.loads(component.__getstate__()) if component is not None else None

            def types(node):
                if isinstance(node, dict):
                    out = [node.get("type")]
                    for v in node.values():
                        out += types(v)
                    return out
                if isinstance(node, list):
                    return [x for v in node for x in types(v)]
                return []

            kinds = set(types(spec_of(backend.decoder))) | set(types(spec_of(backend.pre_tokenizer)))
            if "ByteLevel" in kinds:
                return "byte_level"
            if "Metaspace" in kinds or ("Replace" in kinds and "ByteFallback" in kinds):
                return "sentencepiece"
            if getattr(backend.model, "byte_fallback", False):
                return "sentencepiece"
        except Exception:  # noqa: BLE001 - fall back to the token statistics
            pass
    tokens = list(vocab)
    sp = sum(1 for t in tokens if _SP_SPACE in t or _SP_BYTE.match(t))
    bl = sum(1 for t in tokens if "Ġ" in t or "Ċ" in t)
    if sp == 0 and bl == 0:
        return "plain"
    return "sentencepiece" if sp >= bl else "byte_level"


def _keys(vocab: Mapping[str, int], specials: set, scheme: str) -> Dict[int, tuple]:
    keys = {}
    for token, i in vocab.items():
        if token in specials:
            keys[int(i)] = ("special", token)
            continue
        b = normalize_token(token, scheme)
        keys[int(i)] = ("bytes", b) if b is not None else ("string", token)
    return keys


def build_vocab_map(llm_tokenizer, slm_tokenizer, *, llm_scheme: Optional[str] = None,
                    slm_scheme: Optional[str] = None, llm_size: Optional[int] = None,
                    slm_size: Optional[int] = None) -> VocabMap:
    """Match the two vocabularies token by token (see the module docstring).

    Tokenizers: ``tokenizers.Tokenizer``, a ``transformers`` tokenizer or a ``{token: id}``
    mapping. ``*_scheme``: force "byte_level" / "sentencepiece" / "plain" instead of detecting.
    ``llm_size`` / ``slm_size``: vocabulary sizes (default: largest id + 1), e.g. the logit
    widths; ids past the tokenizer's are unmapped. When several small-model tokens stand for the
    same bytes (a SentencePiece ``<0x20>`` and ``▁``), the lowest id wins.
    """
    lv, ls, lb = _vocab_and_specials(llm_tokenizer)
    sv, ss, sb = _vocab_and_specials(slm_tokenizer)
    if not lv:
        raise ValueError("llm_tokenizer has an empty vocabulary")
    if not sv:
        raise ValueError("slm_tokenizer has an empty vocabulary")
    llm_scheme = llm_scheme or detect_scheme(lv, lb)
    slm_scheme = slm_scheme or detect_scheme(sv, sb)
    for name, sch in (("llm_scheme", llm_scheme), ("slm_scheme", slm_scheme)):
        if sch not in SCHEMES:
            raise ValueError(f"{name} must be one of {SCHEMES}, got {sch!r}")
    n_llm = max(lv.values()) + 1 if llm_size is None else int(llm_size)
    n_slm = max(sv.values()) + 1 if slm_size is None else int(slm_size)
    if n_llm <= max(lv.values()):
        raise ValueError(f"llm_size={n_llm} is smaller than the LLM tokenizer's largest id + 1 ({max(lv.values()) + 1})")
    if n_slm <= max(sv.values()):
        raise ValueError(f"slm_size={n_slm} is smaller than the small tokenizer's largest id + 1 ({max(sv.values()) + 1})")
    slm_by_key: Dict[tuple, int] = {}
    for i, key in sorted(_keys(sv, ss, slm_scheme).items()):
        slm_by_key.setdefault(key, i)
    idx = [-1] * n_llm
    for i, key in _keys(lv, ls, llm_scheme).items():
        idx[i] = slm_by_key.get(key, -1)
    return VocabMap(torch.tensor(idx, dtype=torch.int32), n_slm, llm_scheme, slm_scheme)


def token_bytes(tokenizer, size: Optional[int] = None, scheme: Optional[str] = None) -> list:
    """The bytes each token id stands for (``normalize_token``), ``b""`` for special tokens and ids
    without a token; a list of ``size`` entries (default: largest id + 1).

    What a small model must read after an LLM token (``costeer.retokenize``): byte-fallback tokens
    (``<0xNN>``) give single bytes, so a UTF-8 character split across tokens is reassembled there.
    """
    vocab, specials, backend = _vocab_and_specials(tokenizer)
    scheme = scheme or detect_scheme(vocab, backend)
    n = max(vocab.values()) + 1 if size is None else int(size)
    out = [b""] * n
    for token, i in vocab.items():
        if i >= n or token in specials:
            continue
        b = normalize_token(token, scheme)
        out[int(i)] = b if b is not None else token.encode("utf-8")
    return out
