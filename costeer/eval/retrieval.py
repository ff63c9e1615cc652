"""On-device retrieval of the profile records most relevant to a query: Okapi BM25.

No retrieval library is among the project's dependencies, and BM25 over a few dozen short records is
a handful of lines; the tokenizer is lower-cased word characters.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import List, Sequence

_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> List[str]:
    return _WORD.findall(text.lower())


def bm25_scores(query: str, docs: Sequence[str], k1: float = 1.5, b: float = 0.75) -> List[float]:
    """BM25 score of every document for the query (idf ``log(1 + (N - n + 0.5) / (n + 0.5))``)."""
    toks = [words(d) for d in docs]
    N = len(toks)
    if N == 0:
        return []
    avg = sum(len(t) for t in toks) / N or 1.0
    df = Counter(w for t in toks for w in set(t))
    q = set(words(query))
    out = []
    for t in toks:
        tf = Counter(t)
        s = 0.0
        for w in q:
            if w in tf:
                idf = math.log(1 + (N - df[w] + 0.5) / (df[w] + 0.5))
                s += idf * tf[w] * (k1 + 1) / (tf[w] + k1 * (1 - b + b * len(t) / avg))
        out.append(s)
    return out


def top_k_records(query: str, docs: Sequence[str], k: int) -> List[int]:
    """Indices of the ``k`` best documents, best first (ties: the earlier record first)."""
    scores = bm25_scores(query, docs)
    return sorted(range(len(docs)), key=lambda i: (-scores[i], i))[:k]
