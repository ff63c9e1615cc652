"""Metrics: ROUGE-1/ROUGE-L (``rouge-score``), chrF (``sacrebleu``), keyword hit rate, the small
model's with/without-context log-likelihood ratio of the answer (personalization, no gold needed),
the answer's perplexity under the LLM without the context (fluency), and bootstrap intervals."""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .retrieval import words

# Words too common to say anything about a person (for keywords derived from a context).
_STOP = set("""a about above after again against all also am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further had has have having he
her here hers herself him himself his how i if in into is it its itself just like me more most my myself no nor not
now of off on once only or other our ours ourselves out over own same she should so some such than that the their
theirs them themselves then there these they this those through to too under until up very was we were what when
where which while who whom why will with would you your yours yourself yourselves really much many well love loves
enjoy enjoys every year years usually often always never one two three want wants last since still dont don""".split())


def derived_keywords(context: str, prompt: str, n: int = 8) -> List[str]:
    """The ``n`` most frequent content words of the context that the prompt does not contain."""
    pw = set(words(prompt))
    counts = Counter(w for w in words(context) if len(w) >= 4 and w not in _STOP and w not in pw and not w.isdigit())
    return [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


def keyword_hits(text: str, keywords: Sequence[str]) -> float:
    """Fraction of the keywords that start a word of the text (case-insensitive: "hik" hits "hiking")."""
    if not keywords:
        return float("nan")
    low = text.lower()
    return sum(bool(re.search(r"(?<![a-z0-9])" + re.escape(k.lower()), low)) for k in keywords) / len(keywords)


class GoldScorer:
    """ROUGE-1 / ROUGE-L F1 (stemmed) and sentence chrF against a gold text (0-1 and 0-100)."""

    def __init__(self):
        from rouge_score import rouge_scorer
        from sacrebleu.metrics import CHRF

        self._rouge = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
        self._chrf = CHRF()

    def __call__(self, text: str, gold: Optional[str]) -> Dict[str, float]:
        if not gold:
            return {"rouge1": float("nan"), "rougeL": float("nan"), "chrf": float("nan")}
        r = self._rouge.score(gold, text)
        return {"rouge1": r["rouge1"].fmeasure, "rougeL": r["rougeL"].fmeasure,
                "chrf": self._chrf.sentence_score(text, [gold]).score}


def chat_ids(tokenizer, user_text: str) -> List[int]:
    """One user turn through the tokenizer's chat template, ready for the assistant's answer."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": user_text}], tokenize=False,
                                             add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(user_text)["input_ids"])


@torch.no_grad()
def answer_logprob(loaded, prompt_ids: List[int], answer_ids: List[int]) -> float:
    """Sum of log p(answer token | prompt, earlier answer tokens) under a ``LoadedModel``."""
    ids = torch.tensor([prompt_ids + answer_ids], device=loaded.device)
    logits = loaded.model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1].float()
    lp = torch.log_softmax(logits[:, :loaded.vocab_size], -1)
    return float(lp.gather(1, torch.tensor(answer_ids, device=lp.device)[:, None]).sum())


class LikelihoodScorer:
    """Per answer token: ``llr`` = mean log p_slm(answer | context, prompt) - log p_slm(answer | prompt)
    (personalization: how much more the context explains the answer), and ``ppl`` =
    exp(-mean log p_llm(answer | prompt)) (fluency under the LLM that never saw the context).

    With one model object in both roles the without-context pass is shared by both measures."""

    def __init__(self, llm, slm, context_template: str):
        self.llm, self.slm, self.template = llm, slm, context_template

    def __call__(self, text: str, prompt: str, context: str) -> Dict[str, float]:
        tok = self.slm.tokenizer
        ans = list(tok(text, add_special_tokens=False)["input_ids"]) if text.strip() else []
        if not ans:
            return {"llr": float("nan"), "ppl": float("nan"), "answer_tokens": 0}
        noctx = answer_logprob(self.slm, chat_ids(tok, prompt), ans)
        ctx = answer_logprob(self.slm, chat_ids(tok, self.template.format(context=context, prompt=prompt)), ans)
        if self.llm is self.slm:
            llm_lp = noctx
        else:
            ltok = self.llm.tokenizer
            lans = list(ltok(text, add_special_tokens=False)["input_ids"])
            llm_lp = answer_logprob(self.llm, chat_ids(ltok, prompt), lans) * len(ans) / max(1, len(lans))
        n = len(ans)
        return {"llr": (ctx - noctx) / n, "ppl": math.exp(-llm_lp / n), "answer_tokens": n}


class Perplexity:
    """``exp(-mean log p(answer | prompt))`` per token under one model (its own tokenization of the
    answer, its chat template or plain text): the fluency of a different-tokenizer pair's answers
    under the pair's own LLM without the context (``ppl_pair``)."""

    def __init__(self, loaded):
        self.model = loaded

    def __call__(self, text: str, prompt: str) -> float:
        tok = self.model.tokenizer
        ans = list(tok(text, add_special_tokens=False)["input_ids"]) if text.strip() else []
        if not ans:
            return float("nan")
        return math.exp(-answer_logprob(self.model, chat_ids(tok, prompt), ans) / len(ans))


def bootstrap_ci(values: Sequence[float], n_boot: int = 1000, level: float = 0.95, seed: int = 0):
    """(mean, low, high, n): percentile bootstrap interval of the mean over items (NaNs left out)."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan"), float("nan"), 0
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    a = (1 - level) / 2
    return float(x.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a)), int(x.size)
