"""The small model follows the LLM's text when the two have different tokenizers.

After each token the LLM side chooses, the small model must read the same text in its own tokens.
Re-tokenizing everything generated so far each step costs O(length), and re-running the small
model on it (a re-prefill) far more. ``TailRetokenizer`` keeps a short tail instead:

- the chosen LLM token's bytes (``costeer.vocab.token_bytes``) are appended; an incomplete UTF-8
  sequence at the end (a character split over byte-fallback tokens) waits for its other bytes;
- the tail's text (the last ``tail`` small-model tokens' worth, plus the new text) is tokenized
  again with the small model's tokenizer;
- the result is compared with the tokens already fed for that text: the small model rolls back
  the ones that changed (``KVBatch.edit``) and appends the new ones;
- tokens older than the tail are committed (never re-tokenized), at a boundary where their bytes
  are exactly the start of the text and end on a whole character.

A merge across the commit boundary is thereby missed (the text is still exactly the same; its
tokenization is that of two pieces), which a tail of a few tokens makes rare.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple


def _complete_utf8(data: bytes) -> Tuple[str, bytes]:
    """(the longest decodable prefix as text, the incomplete UTF-8 bytes at the end)."""
    for cut in range(len(data), max(-1, len(data) - 4), -1):
        try:
            return data[:cut].decode("utf-8"), data[cut:]
        except UnicodeDecodeError:
            continue
    # Not UTF-8 at all (a stray continuation byte): decode it as the LLM's detokenizer would.
    return data.decode("utf-8", errors="replace"), b""


class TailRetokenizer:
    """One request's small-model view of the LLM's generated text.

    Args:
        llm_token_bytes: bytes of every LLM token id (``costeer.vocab.token_bytes``).
        slm_tokenizer: the small model's tokenizer.
        slm_token_bytes: bytes of every small-model token id (``costeer.vocab.token_bytes``).
        tail: small-model tokens kept open for re-tokenization (>= 1).
    """

    def __init__(self, llm_token_bytes: Sequence[bytes], slm_tokenizer, slm_token_bytes: Sequence[bytes],
                 tail: int = 6):
        if isinstance(tail, bool) or not isinstance(tail, int) or tail < 1:
            raise ValueError(f"tail must be an int >= 1, got {tail!r}")
        self.table = llm_token_bytes
        self.tok = slm_tokenizer
        self.slm_bytes = slm_token_bytes
        self.tail = tail
        self.pending = b""  # bytes of an incomplete UTF-8 character
        self.text = ""  # the text not yet committed
        self.fed: List[int] = []  # small-model tokens fed for ``text``
        self.committed = 0  # small-model tokens committed before ``text``
        self.rollbacks = 0  # tokens taken back so far (a statistic)

    def push(self, llm_token: int) -> Tuple[int, List[int]]:
        """Feed one chosen LLM token; returns (small-model tokens to roll back, tokens to append)."""
        data = self.pending + (self.table[llm_token] if 0 <= llm_token < len(self.table) else b"")
        new_text, self.pending = _complete_utf8(data)
        if not new_text:
            return 0, []
        self.text += new_text
        ids = list(self.tok(self.text, add_special_tokens=False)["input_ids"])
        same = 0
        for a, b in zip(self.fed, ids):
            if a != b:
                break
            same += 1
        back, new = len(self.fed) - same, ids[same:]
        self.rollbacks += back
        self.fed = ids
        if len(ids) > self.tail:
            raw = self.text.encode("utf-8")
            for k in range(len(ids) - self.tail, 0, -1):
                head = b"".join(self.slm_bytes[t] for t in ids[:k])
                if not raw.startswith(head):
                    continue
                try:
                    rest = raw[len(head):].decode("utf-8")
                except UnicodeDecodeError:  # the boundary splits a character
                    continue
                self.text, self.fed = rest, ids[k:]
                self.committed += k
                break
        return back, new
