"""The batched KV cache for any Hugging Face causal LM: rows with their own lengths (left padding),
append, rollback and edit of a row's tail, used by the small model, the in-process LLM and
``costeer serve``.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass
class StepOutput:
    logits: Optional[torch.Tensor]  # float32 [R, V]; None when the head was skipped (head=False)
    hidden: Optional[torch.Tensor]  # [R, H] final hidden states (post final norm), or None


def _cache_kwarg(fn) -> str:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _right_aligned_positions(counts: torch.Tensor, width: int) -> torch.Tensor:
    """Position ids [R, width] of rows whose ``counts[r]`` real tokens are right-aligned: 0, 1, ...
    over the real tokens, 0 on the padding in front of them (masked anyway)."""
    return (torch.arange(width, device=counts.device)[None, :] - (width - counts)[:, None]).clamp(min=0)


_GROWING = None
# The prefill packs the rows into ONE sequence that holds each shared prompt prefix once (a prefix
# tree: the two passes of a request share the chat template's system prompt, as do the requests of
# a batch), with a tree-shaped attention mask, instead of padding every row to the longest. Used
# while the packed sequence is at most this long (its mask is P x P and its attention does the
# work of all rows at once) and cheaper than the padded rows by the cost model in KVBatch._pack.
# COSTEER_PACKED_PREFILL=0 turns it off.
_MAX_PACKED = 1024
_PACKED_PREFILL = os.environ.get("COSTEER_PACKED_PREFILL", "1") != "0"


def _growing_layer_class():
    """``DynamicLayer`` with spare capacity: appending copies only the new positions.

    transformers' ``DynamicLayer.update`` concatenates, so every decode step copies the whole cache
    of every layer into a fresh allocation (with 3 rows of a few hundred positions that was 120
    copies of ~0.5 MB per step, 13% of a co-batched SmolLM2 step). Here keys and values are views
    of buffers that grow geometrically. ``crop`` (speculative rollback) keeps them views, so the
    next append overwrites the dropped positions; anything that replaces ``keys`` (batch
    selection, reordering) is detected and copied into a new buffer at the next append.
    """
    global _GROWING
    if _GROWING is None:
        from transformers.cache_utils import DynamicLayer

        class GrowingLayer(DynamicLayer):
            _kbuf = None
            _vbuf = None

            def update(self, key_states, value_states, *args, **kwargs):
                if not self.is_initialized:
                    self.lazy_initialization(key_states, value_states)
                k, v = self.keys, self.values
                n = k.shape[-2] if k is not None and k.dim() == 4 else 0
                add = key_states.shape[-2]
                kb, vb = self._kbuf, self._vbuf
                fits = (kb is not None and kb.shape[-2] >= n + add and kb.dtype == key_states.dtype
                        and kb.shape[:2] == key_states.shape[:2] and kb.shape[-1] == key_states.shape[-1]
                        and vb.shape[:2] == value_states.shape[:2] and vb.shape[-1] == value_states.shape[-1]
                        and (n == 0 or (k.data_ptr() == kb.data_ptr() and k.stride() == kb.stride()
                                        and v.data_ptr() == vb.data_ptr() and v.stride() == vb.stride())))
                if not fits:
                    cap = max(64, 2 * (n + add))
                    B, Hk, _, Dk = key_states.shape
                    kb = key_states.new_empty((B, Hk, cap, Dk))
                    vb = value_states.new_empty((B, value_states.shape[1], cap, value_states.shape[-1]))
                    if n:
                        kb[:, :, :n].copy_(k)
                        vb[:, :, :n].copy_(v)
                    self._kbuf, self._vbuf = kb, vb
                kb[:, :, n:n + add].copy_(key_states)
                vb[:, :, n:n + add].copy_(value_states)
                self.keys, self.values = kb[:, :, :n + add], vb[:, :, :n + add]
                return self.keys, self.values

            def adopt(self, keys, values):
                """Take these keys and values as the layer's (a re-laid-out prefill), with spare room."""
                n = keys.shape[-2]
                cap = max(64, 2 * n)
                kb = keys.new_empty((*keys.shape[:2], cap, keys.shape[-1]))
                vb = values.new_empty((*values.shape[:2], cap, values.shape[-1]))
                kb[:, :, :n].copy_(keys)
                vb[:, :, :n].copy_(values)
                self._kbuf, self._vbuf = kb, vb
                self.keys, self.values = kb[:, :, :n], vb[:, :, :n]

        _GROWING = GrowingLayer
    return _GROWING


def _new_cache(model):
    from transformers import DynamicCache

    try:
        cache = DynamicCache(config=model.config)
    except TypeError:  # pragma: no cover - older transformers
        return DynamicCache()
    try:  # full-attention layers grow in place; sliding-window and other layer kinds stay as they are
        from transformers.cache_utils import DynamicLayer

        growing = _growing_layer_class()
        layers = getattr(cache, "layers", None)
        for i, layer in enumerate(layers or ()):
            if type(layer) is DynamicLayer and not layer.is_initialized:
                new = growing.__new__(growing)
                new.__dict__.update(layer.__dict__)
                layers[i] = new
        if getattr(cache, "layer_class_to_replicate", None) is DynamicLayer:
            cache.layer_class_to_replicate = growing
    except (ImportError, AttributeError):  # pragma: no cover - another cache layout: keep transformers' layers
        pass
    return cache


class KVBatch:
    """R token rows of different lengths, left-padded, sharing one KV cache."""

    def __init__(self, model, rows: Sequence[Sequence[int]], pad_token_id: int, max_len: Optional[int] = None):
        if not rows:
            raise ValueError("rows must hold at least one prompt")
        for i, r in enumerate(rows):
            if len(r) == 0:
                raise ValueError(f"rows[{i}] is empty: every prompt needs at least one token")
        self.model = model
        self.max_len = max_len
        self.device = next(model.parameters()).device
        lengths = [len(r) for r in rows]
        L = max(lengths)
        R = len(rows)
        ids = torch.full((R, L), int(pad_token_id), dtype=torch.long)
        mask = torch.zeros((R, L), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, L - len(r):] = torch.as_tensor(list(r), dtype=torch.long)
            mask[i, L - len(r):] = 1
        self._rows = R
        self._prompts = [list(r) for r in rows]
        self._ids = ids.to(self.device)
        self._mask = mask.to(self.device)
        self.lengths = torch.tensor(lengths, dtype=torch.long)  # real tokens per row so far
        self._pos = _right_aligned_positions(self.lengths, L).to(self.device)
        self.cache = _new_cache(model)
        out_emb = model.get_output_embeddings()
        base = getattr(model, "model", None)
        softcap = getattr(model.config, "final_logit_softcapping", None)
        # Split "base model -> final hidden -> lm_head" when the model is that simple (Llama, Qwen,
        # Mistral, ...); otherwise call the full model and report no hidden states.
        self._split = base is not None and out_emb is not None and not softcap and callable(base)
        self._base = base
        self._head = out_emb
        self._kw = _cache_kwarg((base if self._split else model).forward)
        self._prefilled = False
        # Decode steps of a Llama model as one flat loop (costeer/fast_decode.py): transformers'
        # hidden states bit for bit, checked on the model's first decode step.
        from .fast_decode import decode_step_for

        self._decode = decode_step_for(model) if self._split else None

    @property
    def rows(self) -> int:
        return self._rows

    @property
    def head(self) -> Optional[torch.nn.Module]:
        """The vocabulary projection applied to ``hidden`` (None when the model is not split)."""
        return self._head if self._split else None

    def _forward(self, ids, mask, pos, head: bool = True) -> StepOutput:
        kw = {self._kw: self.cache, "use_cache": True, "attention_mask": mask, "position_ids": pos}
        with torch.inference_mode():
            if self._split:
                h = self._decode_hidden(ids, mask, pos) if self._decode is not None and ids.shape[1] == 1 else None
                if h is None:
                    h = self._base(input_ids=ids, **kw).last_hidden_state[:, -1]
                logits = self._head(h).float() if head else None
            else:
                out = self.model(input_ids=ids, logits_to_keep=1, **kw)
                logits, h = out.logits[:, -1].float(), None
        return StepOutput(logits=logits, hidden=h)

    def _decode_hidden(self, ids, mask, pos) -> Optional[torch.Tensor]:
        """The flat decode step's hidden states, or None where transformers' forward runs."""
        from . import fast_decode

        step = self._decode
        if not step.usable():
            return None
        state = fast_decode.checked(self.model)
        if state is None:
            # This model's first decode step runs both ways on the same position: the flat step,
            # then (its appended keys and values rolled back) transformers' forward, whose keys,
            # values and hidden states are the ones kept; the flat step is used from then on only
            # if its hidden states were identical.
            before = [layer.get_seq_length() for layer in self.cache.layers]
            try:
                got, error = step.step(ids, mask, pos, self.cache), None
            except Exception as exc:  # a transformers whose modules no longer fit the flat step
                got, error = None, exc
            for layer, n in zip(self.cache.layers, before):
                extra = layer.get_seq_length() - n
                if extra > 0:
                    layer.crop(-extra)
            kw = {self._kw: self.cache, "use_cache": True, "attention_mask": mask, "position_ids": pos}
            ref = self._base(input_ids=ids, **kw).last_hidden_state[:, -1]
            fast_decode.record_check(self.model, step, got is not None and torch.equal(ref, got), error)
            return ref
        if state is False:
            self._decode = None
            return None
        return step.step(ids, mask, pos, self.cache)

    def prefill(self, head: bool = True) -> StepOutput:
        """Run the prompts. ``head=False``: return the hidden states only (split models), the
        vocabulary projection is left to the caller (``steer_from_hidden``)."""
        if self._prefilled:
            raise RuntimeError("KVBatch.prefill called twice")
        self._prefilled = True
        packed = self._pack()
        if packed is not None:
            out = self._prefill_packed(*packed, head=head)
        else:
            out = self._forward(self._ids, self._mask, self._pos, head)
        self._next_pos = self._pos[:, -1] + 1
        self._ids = self._prompts = None
        return out

    def _pack(self):
        """The rows as a prefix tree: (tokens [P], depth [P], each row's node indices), or None when
        the padded one-shot prefill is as cheap or the cache has other than full-attention layers
        (a sliding window counts cache columns, which the re-laid-out rows would not match)."""
        rows, R = self._prompts, self._rows
        if R < 2 or not _PACKED_PREFILL:
            return None
        layers = getattr(self.cache, "layers", None)
        if not layers or not all(type(layer) is _growing_layer_class() for layer in layers):
            return None
        tokens, depth, node_of, paths = [], [], {}, []
        for r in rows:
            node, path = -1, []
            for d, t in enumerate(r):
                key = (node, int(t))
                nxt = node_of.get(key)
                if nxt is None:
                    nxt = node_of[key] = len(tokens)
                    tokens.append(int(t))
                    depth.append(d)
                path.append(nxt)
                node = nxt
            paths.append(path)
        P, L = len(tokens), max(len(r) for r in rows)
        # Cost in token positions: the products scale with positions; attention over P keys for
        # each of P queries adds about P / 3000 of a position each for a 135M-parameter model.
        if P > _MAX_PACKED or P * (1 + P / 3000) >= R * L * (1 + L / 3000):
            return None
        return tokens, depth, paths

    def _prefill_packed(self, tokens, depth, paths, head: bool) -> StepOutput:
        """ONE forward of the packed prefix tree (each token attends to its ancestors and itself, at
        position id = its depth), then its keys and values laid out as the usual left-padded rows."""
        dev, R, P = self.device, self._rows, len(tokens)
        L = self._mask.shape[1]
        allowed = torch.zeros((P, P), dtype=torch.bool)
        for path in paths:
            idx = torch.as_tensor(path)
            allowed[idx[:, None], idx[None, :]] |= torch.ones((len(path), len(path)), dtype=torch.bool).tril_()
        dtype = next(self.model.parameters()).dtype
        mask = torch.zeros((1, 1, P, P), dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min).to(dev)
        ids = torch.as_tensor(tokens, dtype=torch.long, device=dev)[None]
        pos = torch.as_tensor(depth, dtype=torch.long, device=dev)[None]
        last = torch.as_tensor([path[-1] for path in paths], dtype=torch.long, device=dev)
        kw = {self._kw: self.cache, "use_cache": True, "attention_mask": mask, "position_ids": pos}
        with torch.inference_mode():
            if self._split:
                h = self._base(input_ids=ids, **kw).last_hidden_state[0, last]
                logits = self._head(h).float() if head else None
            else:
                logits, h = self.model(input_ids=ids, logits_to_keep=last, **kw).logits[0].float(), None
            # Row r's cache columns: padding (any node: masked), then its path's nodes.
            gather = torch.zeros((R, L), dtype=torch.long)
            for r, path in enumerate(paths):
                gather[r, L - len(path):] = torch.as_tensor(path)
            gather = gather.flatten().to(dev)
            for layer in self.cache.layers:
                k, v = layer.keys[0], layer.values[0]
                layer.adopt(k.index_select(1, gather).view(k.shape[0], R, L, k.shape[-1]).transpose(0, 1),
                            v.index_select(1, gather).view(v.shape[0], R, L, v.shape[-1]).transpose(0, 1))
        return StepOutput(logits=logits, hidden=h)

    def step(self, tokens, head: bool = True) -> StepOutput:
        """Append one token per row (int list or LongTensor [R]) and return the next logits."""
        if not self._prefilled:
            raise RuntimeError("KVBatch.step called before prefill")
        t = torch.as_tensor(tokens, dtype=torch.long, device=self.device).reshape(-1)
        if t.numel() != self.rows:
            raise ValueError(f"tokens has {t.numel()} entries, expected one per row ({self.rows})")
        if self.max_len is not None and int(self.lengths.max()) + 1 > self.max_len:
            raise ValueError(f"sequence would exceed the model's window of {self.max_len} tokens")
        self._mask = torch.cat([self._mask, torch.ones((self.rows, 1), dtype=self._mask.dtype, device=self.device)], 1)
        pos = self._next_pos[:, None]
        out = self._forward(t[:, None], self._mask, pos, head)
        self._next_pos = self._next_pos + 1
        self.lengths += 1
        return out

    def edit(self, rollback: Sequence[int], tokens: Sequence[Sequence[int]], head: bool = True) -> StepOutput:
        """Per row: forget its last ``rollback[r]`` tokens, then append ``tokens[r]`` (any counts).

        For a small model that follows another model's text (different tokenizers): a re-tokenized
        tail changes a few tokens per row. Rows advance by different counts, so the forgotten
        positions and the shorter rows' padding become masked holes in the cache (attention skips
        them; position ids count real tokens only) instead of re-running any prefix. One forward
        of max(len(tokens[r])) positions; a row with no new tokens keeps its position.

        Returns the outputs at each row's last appended token ([R, V] / [R, H]); rows that
        appended nothing get zeros there (the caller keeps their previous output).
        """
        if not self._prefilled:
            raise RuntimeError("KVBatch.edit called before prefill")
        if len(rollback) != self.rows or len(tokens) != self.rows:
            raise ValueError(f"rollback and tokens need one entry per row ({self.rows})")
        lengths = self.lengths.tolist()
        for r, (k, t) in enumerate(zip(rollback, tokens)):
            if k < 0 or lengths[r] - k < 1:
                raise ValueError(f"row {r}: cannot roll back {k} of its {lengths[r]} tokens")
            if self.max_len is not None and lengths[r] - k + len(t) > self.max_len:
                raise ValueError(f"sequence would exceed the model's window of {self.max_len} tokens")
        if any(rollback):
            mask = self._mask.clone()
            for r, k in enumerate(rollback):
                if k:
                    real = torch.nonzero(mask[r]).flatten()
                    mask[r, real[-k:]] = 0
            self._mask = mask
        n = max(len(t) for t in tokens)
        back = torch.as_tensor(list(rollback), dtype=torch.long, device=self.device)
        self._next_pos = self._next_pos - back
        self.lengths -= back.cpu()
        if n == 0:
            return StepOutput(logits=None, hidden=None)
        ids = torch.full((self.rows, n), 0, dtype=torch.long)
        new = torch.zeros((self.rows, n), dtype=self._mask.dtype)
        for r, t in enumerate(tokens):
            if t:  # right-aligned: the last column is every appending row's newest token
                ids[r, n - len(t):] = torch.as_tensor(list(t), dtype=torch.long)
                new[r, n - len(t):] = 1
        new = new.to(self.device)
        counts = new.sum(1)
        # Real tokens continue the row's positions; holes take the row's next position (masked anyway).
        pos = self._next_pos[:, None] + _right_aligned_positions(counts, n)
        self._mask = torch.cat([self._mask, new], 1)
        out = self._forward(ids.to(self.device), self._mask, pos, head)
        self._next_pos = self._next_pos + counts
        self.lengths += counts.cpu()
        keep = (counts > 0)[:, None]
        if out.logits is not None:
            out.logits = torch.where(keep, out.logits, torch.zeros_like(out.logits))
        if out.hidden is not None:
            out.hidden = torch.where(keep.to(out.hidden.device), out.hidden, torch.zeros_like(out.hidden))
        return out

    # -- speculative steering (costeer/speculative.py): several tokens per row, and rollback

    def extend(self, tokens, head: bool = True) -> StepOutput:
        """Append n tokens to every row (LongTensor / nested list [R, n]) in ONE forward.

        Returns the logits of every appended position, float32 [R, n, V] (hidden: [R, n, H] or None).
        ``head=False`` on a split model skips the vocabulary projection (logits None, hidden only).
        """
        if not self._prefilled:
            raise RuntimeError("KVBatch.extend called before prefill")
        t = torch.as_tensor(tokens, dtype=torch.long, device=self.device)
        if t.dim() != 2 or t.shape[0] != self.rows or t.shape[1] < 1:
            raise ValueError(f"tokens must have shape [{self.rows}, n>=1], got {tuple(t.shape)}")
        n = int(t.shape[1])
        if self.max_len is not None and int(self.lengths.max()) + n > self.max_len:
            raise ValueError(f"sequence would exceed the model's window of {self.max_len} tokens")
        self._mask = torch.cat([self._mask, torch.ones((self.rows, n), dtype=self._mask.dtype, device=self.device)], 1)
        pos = self._next_pos[:, None] + torch.arange(n, device=self.device)[None, :]
        kw = {self._kw: self.cache, "use_cache": True, "attention_mask": self._mask, "position_ids": pos}
        with torch.inference_mode():
            if self._split:
                h = self._base(input_ids=t, **kw).last_hidden_state
                logits = self._head(h) if head else None
            else:
                logits, h = self.model(input_ids=t, **kw).logits, None
        self._next_pos = self._next_pos + n
        self.lengths += n
        return StepOutput(logits=None if logits is None else logits.float(), hidden=h)

    @property
    def cached(self) -> int:
        """Positions held in the KV cache (padding included)."""
        return int(self._mask.shape[1]) if self._prefilled else 0

    def rollback(self, n: int) -> None:
        """Forget the last ``n`` positions of every row (KV cache, mask, positions): afterwards the
        batch is as if those tokens had never been fed."""
        n = int(n)
        if n < 0:
            raise ValueError(f"rollback count must be >= 0, got {n}")
        if n == 0:
            return
        if not self._prefilled or int(self.lengths.min()) - n < 1:
            raise ValueError(f"cannot roll back {n} positions: some row would have fewer than 1 token")
        self.cache.crop(-n)  # negative: remove n (transformers >= 4.4x; absolute length in older ones)
        self._mask = self._mask[:, :-n]
        self._next_pos = self._next_pos - n
        self.lengths -= n
