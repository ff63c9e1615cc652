"""Evaluation items and their JSONL readers (strict: a bad line names the file, line and field).

Two formats, one JSON object per line:

* **simple**: ``{"id"?, "context", "prompt", "gold"?, "keywords"?, "kind"?, "persona"?}``.
  ``context`` is the private text the small model reads; ``prompt`` is the public request.
* **LongLaMP-style**: ``{"id"?, "input", "profile", "output"?, "keywords"?, "kind"?, "persona"?}``.
  ``profile`` is the user's past records (a list of objects whose string fields are their text);
  the ``k`` records most relevant to ``input`` (BM25, :mod:`costeer.eval.retrieval`) become the
  private context, on the device. ``output`` is the gold text.

:func:`load_longlamp` reads the public LongLaMP files (``LongLaMP/LongLaMP`` on the Hugging Face
Hub, saved locally; see ``docs/eval.md``), which carry extra fields and are read leniently about
those.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from .retrieval import top_k_records

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
PROJECT_SET = os.path.join(DATA_DIR, "project_set.jsonl")
PROJECT_SET_PROFILES = os.path.join(DATA_DIR, "project_set_profiles.jsonl")

SIMPLE_FIELDS = {"id", "context", "prompt", "gold", "keywords", "kind", "persona"}
LONGLAMP_FIELDS = {"id", "input", "profile", "output", "keywords", "kind", "persona"}

# Public LongLaMP tasks: the config name on the Hub and the profile fields that make a record's text.
LONGLAMP_TASKS = {
    "abstract_generation": ("abstract_generation_user", ("title", "abstract")),
    "product_review": ("product_review_user", ("overall", "summary", "description", "reviewText")),
    "topic_writing": ("topic_writing_user", ("summary", "content")),
}


class DataError(ValueError):
    """A malformed evaluation file: the message names the file, the line and the field."""


@dataclass
class EvalItem:
    """One evaluation item: the public prompt, the private context, and what to score against."""

    id: str
    prompt: str
    context: str
    gold: Optional[str] = None
    keywords: List[str] = field(default_factory=list)
    kind: str = ""
    persona: str = ""
    source: str = ""  # "file:line"


def _fail(path: str, line: int, fld: Optional[str], msg: str):
    where = f"{path}:{line}" + (f": field {fld!r}" if fld else "")
    raise DataError(f"{where}: {msg}")


def _str(rec, key, path, n, *, required, empty_ok=False):
    if key not in rec:
        if required:
            _fail(path, n, key, "missing (required)")
        return None
    v = rec[key]
    if not isinstance(v, str):
        _fail(path, n, key, f"must be a string, got {type(v).__name__}")
    if not empty_ok and not v.strip():
        _fail(path, n, key, "must be a non-empty string")
    return v


def _keywords(rec, path, n) -> List[str]:
    v = rec.get("keywords", [])
    if not isinstance(v, list) or not all(isinstance(k, str) and k.strip() for k in v):
        _fail(path, n, "keywords", "must be a list of non-empty strings")
    return [k.strip() for k in v]


def _records(path: str):
    """(line number, dict) per non-blank line; invalid JSON or a non-object is an error."""
    try:
        f = open(path, encoding="utf-8")
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc}") from None
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as exc:
                _fail(path, n, None, f"not valid JSON ({exc})")
            if not isinstance(rec, dict):
                _fail(path, n, None, f"must be a JSON object, got {type(rec).__name__}")
            yield n, rec


def _profile_text(rec: Dict, path: str, n: int, i: int, fields: Optional[Sequence[str]] = None) -> str:
    if not isinstance(rec, dict):
        _fail(path, n, f"profile[{i}]", f"must be an object, got {type(rec).__name__}")
    keys = [k for k in (fields or rec.keys()) if k in rec and k != "id"]
    parts = []
    for k in keys:
        v = rec[k]
        if isinstance(v, (int, float)) and not isinstance(v, bool) and fields is not None:
            parts.append(f"{k}: {v}")  # e.g. a review's star rating
        elif isinstance(v, str) and v.strip():
            parts.append(v.strip())
    if not parts:
        _fail(path, n, f"profile[{i}]", "has no non-empty text field")
    return "\n".join(parts)


def _item_id(rec, path, n):
    if "id" not in rec:
        return f"{os.path.basename(path)}:{n}"
    v = rec["id"]
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        _fail(path, n, "id", f"must be a string or an integer, got {type(v).__name__}")
    return str(v)


def _check_unique(items: List[EvalItem], path: str):
    seen = {}
    for it in items:
        if it.id in seen:
            raise DataError(f"{it.source}: field 'id': {it.id!r} repeats the id of {seen[it.id]}")
        seen[it.id] = it.source


def read_simple(path: str) -> List[EvalItem]:
    """Items of a simple-format JSONL file (see the module docstring)."""
    items = []
    for n, rec in _records(path):
        extra = set(rec) - SIMPLE_FIELDS
        if extra:
            _fail(path, n, sorted(extra)[0], f"unknown field (allowed: {', '.join(sorted(SIMPLE_FIELDS))})")
        items.append(EvalItem(id=_item_id(rec, path, n), prompt=_str(rec, "prompt", path, n, required=True),
                              context=_str(rec, "context", path, n, required=True, empty_ok=True),
                              gold=_str(rec, "gold", path, n, required=False), keywords=_keywords(rec, path, n),
                              kind=_str(rec, "kind", path, n, required=False) or "",
                              persona=_str(rec, "persona", path, n, required=False) or "", source=f"{path}:{n}"))
    _check_unique(items, path)
    return items


def _from_profile(rec, path, n, k, fields=None, strict=True) -> EvalItem:
    if strict:
        extra = set(rec) - LONGLAMP_FIELDS
        if extra:
            _fail(path, n, sorted(extra)[0], f"unknown field (allowed: {', '.join(sorted(LONGLAMP_FIELDS))})")
    query = _str(rec, "input", path, n, required=True)
    prof = rec.get("profile")
    if not isinstance(prof, list) or not prof:
        _fail(path, n, "profile", "must be a non-empty list of past records (objects)")
    texts = [_profile_text(r, path, n, i, fields) for i, r in enumerate(prof)]
    context = "\n\n".join(texts[i] for i in top_k_records(query, texts, k))
    return EvalItem(id=_item_id(rec, path, n), prompt=query, context=context,
                    gold=_str(rec, "output", path, n, required=False),
                    keywords=_keywords(rec, path, n) if strict else [],
                    kind=(_str(rec, "kind", path, n, required=False) or "") if strict else "",
                    persona=(_str(rec, "persona", path, n, required=False) or "") if strict else "",
                    source=f"{path}:{n}")


def read_longlamp_style(path: str, k: int = 3) -> List[EvalItem]:
    """Items of a LongLaMP-style JSONL file; the top-``k`` profile records (BM25) form the context."""
    _check_k(k)
    items = [_from_profile(rec, path, n, k) for n, rec in _records(path)]
    _check_unique(items, path)
    return items


def _check_k(k):
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (profile records retrieved) must be an int >= 1, got {k!r}")


def read_items(path: str, k: int = 3) -> List[EvalItem]:
    """Items of a JSONL file in either format, told apart by the first record's keys."""
    for _, rec in _records(path):
        if "profile" in rec or "input" in rec:
            return read_longlamp_style(path, k)
        return read_simple(path)
    raise DataError(f"{path}: no records")


def project_set(k: int = 3) -> List[EvalItem]:
    """The project's own evaluation set (both shipped files, simple items first)."""
    return read_simple(PROJECT_SET) + read_longlamp_style(PROJECT_SET_PROFILES, k)


def load_longlamp(root: str, task: str, split: str = "val", k: int = 3, limit: Optional[int] = None) -> List[EvalItem]:
    """Items of a public LongLaMP file saved locally: ``root/<config>/<split>.jsonl`` (or ``.json``,
    one JSON array), ``<config>`` being ``abstract_generation_user``, ``product_review_user`` or
    ``topic_writing_user``. Records keep their extra fields (ignored); ``input``, ``profile`` and
    ``output`` are checked as in the LongLaMP-style format."""
    if task not in LONGLAMP_TASKS:
        raise ValueError(f"task must be one of {sorted(LONGLAMP_TASKS)}, got {task!r}")
    _check_k(k)
    config, fields = LONGLAMP_TASKS[task]
    base = os.path.join(root, config, split)
    if os.path.isfile(base + ".jsonl"):
        path = base + ".jsonl"
        recs = _records(path)
    elif os.path.isfile(base + ".json"):
        path = base + ".json"
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: cannot read a JSON array: {exc}") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: must hold a JSON array of records")
        recs = ((i + 1, r) for i, r in enumerate(data))
    else:
        raise DataError(f"no LongLaMP file for task {task!r}, split {split!r}: expected {base}.jsonl or {base}.json")
    items = []
    for n, rec in recs:
        if not isinstance(rec, dict):
            _fail(path, n, None, f"must be a JSON object, got {type(rec).__name__}")
        item = _from_profile(rec, path, n, k, fields=fields, strict=False)
        item.kind = task
        items.append(item)
        if limit is not None and len(items) >= limit:
            break
    _check_unique(items, path)
    return items
