"""Wire format of ``costeer serve`` (version 1).

Every message, in both directions, is ONE binary WebSocket frame:

    u32 little-endian  header length N
    N bytes            header: a UTF-8 JSON object (always has "op")
    rest               payload: raw little-endian arrays whose dtype and shape the header states

Nothing received is ever unpickled or evaluated: headers go through ``json.loads`` and payloads
through ``numpy.frombuffer`` with a dtype chosen by the receiver from a fixed list, after checking
the byte count.

Client -> server
    {"op": "hello"}                                             -> hello
    {"op": "open", "sid": S, "rows": [L0, L1, ...],             payload int32[sum(L)] prompt ids
     "format": "full" | "topk", "dtype": "float16" | "bfloat16" | "float32", "k": K,
     "replay": N (optional, resume)}                            then int32[N, B] tokens already fed
                                                                -> logits (step N)
    {"op": "step", "sid": S}                                    payload int32[B] chosen tokens
                                                                -> logits (next step)
    {"op": "close", "sid": S}                                   -> closed

Server -> client
    {"op": "hello", "protocol": 1, "model": name, "vocab_size": V, "max_len": W,
     "eos_token_ids": [...], "limits": {...}}
    {"op": "logits", "sid": S, "step": t, "rows": B, "vocab_size": V, "format": F, "dtype": D,
     "k": K, "compute_ms": x, "session": random id (answer to open only)}
        format "full": payload D[B, V] raw logits (bfloat16 as its raw 16 bits)
        format "topk": payload int32[B, K] token ids, then float32[B, K] log-probs (descending)
    {"op": "closed", "sid": S}
    {"op": "error", "sid": S or null, "code": "bad_request" | "busy" | "expired" | "internal",
     "message": "..."}

``sid`` is the client's handle for a session inside its own connection (sessions never cross
connections). ``replay`` resumes after a lost connection or a server restart: the server prefills
the prompts and re-runs the N steps, so the answer equals the one the lost request would have had.
"""
from __future__ import annotations

import json
import struct
from typing import Any, Dict, Sequence, Tuple

import numpy as np
import torch

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024
WIRE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
FORMATS = ("full", "topk")


class ProtocolError(ValueError):
    """A malformed frame."""


def encode(header: Dict[str, Any], payload=b"") -> bytes:
    """One frame; ``payload`` is any bytes-like object, copied once (into the frame)."""
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return b"".join((struct.pack("<I", len(h)), h, payload))


def frame_buffer(header: Dict[str, Any], payload_bytes: int) -> Tuple[bytearray, memoryview]:
    """A frame of ``header`` with room for ``payload_bytes``: ``(frame, its payload view)``, so a large
    payload can be written in place, piece by piece."""
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    frame = bytearray(4 + len(h) + payload_bytes)
    struct.pack_into("<I", frame, 0, len(h))
    frame[4:4 + len(h)] = h
    return frame, memoryview(frame)[4 + len(h):]


def decode(frame) -> Tuple[Dict[str, Any], memoryview]:
    if isinstance(frame, str):
        raise ProtocolError("text frames are not accepted: send binary frames")
    mv = memoryview(frame)
    if len(mv) < 4:
        raise ProtocolError("frame shorter than its 4-byte header length")
    (n,) = struct.unpack_from("<I", mv, 0)
    if n > MAX_HEADER_BYTES or 4 + n > len(mv):
        raise ProtocolError(f"bad header length {n}")
    try:
        header = json.loads(bytes(mv[4:4 + n]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"header is not UTF-8 JSON: {exc}") from None
    except RecursionError:  # a deeply nested header: refused like any other malformed one
        raise ProtocolError("header nests too deeply") from None
    if not isinstance(header, dict) or not isinstance(header.get("op"), str):
        raise ProtocolError("header must be a JSON object with a string 'op'")
    return header, mv[4 + n:]


def int32_array(payload: memoryview, count: int | None = None) -> np.ndarray:
    if len(payload) % 4:
        raise ProtocolError(f"payload of {len(payload)} bytes is not a whole number of int32")
    arr = np.frombuffer(payload, dtype="<i4")
    if count is not None and arr.size != count:
        raise ProtocolError(f"expected {count} int32 values, got {arr.size}")
    return arr


def pack_int32(values) -> bytes:
    return np.asarray(values, dtype="<i4").tobytes()


def score_frame(sid: int, tokens: Sequence[Sequence[int]], rollback: int = 0) -> Tuple[dict, bytes]:
    """(header, payload) of a "score" request: ``tokens`` one equal-length list per row."""
    n = len(tokens[0]) if tokens else 0
    if n < 1 or any(len(t) != n for t in tokens):
        raise ValueError("score: every row needs the same number (>= 1) of tokens")
    if isinstance(rollback, bool) or not isinstance(rollback, int) or rollback < 0:
        raise ValueError(f"score: rollback must be an int >= 0, got {rollback!r}")
    return {"op": "score", "sid": sid, "n": n, "rollback": rollback}, pack_int32([int(x) for t in tokens for x in t])


def pack_full(logits: torch.Tensor, dtype: str) -> memoryview:
    """The payload of a "full" answer: a view of ``logits`` in the wire dtype (for ``encode``, which
    copies it into the frame; no third copy of a large answer)."""
    t = logits.detach().to("cpu", WIRE_DTYPES[dtype]).contiguous()
    if dtype == "bfloat16":
        return memoryview(t.view(torch.int16).numpy().astype("<i2", copy=False)).cast("B")
    return memoryview(t.numpy().astype("<f4" if dtype == "float32" else "<f2", copy=False)).cast("B")


def unpack_full(payload: memoryview, rows: int, vocab: int, dtype: str) -> torch.Tensor:
    if dtype not in WIRE_DTYPES:
        raise ProtocolError(f"unknown dtype {dtype!r}")
    item = 4 if dtype == "float32" else 2
    if len(payload) != rows * vocab * item:
        raise ProtocolError(f"full logits payload has {len(payload)} bytes, expected {rows * vocab * item}")
    if dtype == "float32":
        arr = np.frombuffer(payload, dtype="<f4").reshape(rows, vocab)
        return torch.from_numpy(arr.copy())
    if dtype == "float16":
        arr = np.frombuffer(payload, dtype="<f2").reshape(rows, vocab)
        return torch.from_numpy(arr.astype(np.float32))
    arr = np.frombuffer(payload, dtype="<i2").reshape(rows, vocab)
    return torch.from_numpy(arr.copy()).view(torch.bfloat16).float()


def topk_arrays(logits: torch.Tensor, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """The ``k`` most likely ids (int32) and their log-probs (float32) of every row, descending."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    vals, ids = torch.topk(lp, k, dim=-1)
    return ids.cpu().numpy().astype("<i4"), vals.cpu().numpy().astype("<f4")


def pack_topk(logits: torch.Tensor, k: int) -> bytes:
    ids, vals = topk_arrays(logits, k)
    return ids.tobytes() + vals.tobytes()


def unpack_topk(payload: memoryview, rows: int, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    if len(payload) != rows * k * 8:
        raise ProtocolError(f"top-k payload has {len(payload)} bytes, expected {rows * k * 8}")
    ids = np.frombuffer(payload[: rows * k * 4], dtype="<i4").reshape(rows, k)
    vals = np.frombuffer(payload[rows * k * 4:], dtype="<f4").reshape(rows, k)
    return torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(vals.copy())
