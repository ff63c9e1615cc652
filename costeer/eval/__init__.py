"""Personalization quality of CoSteer and its baselines (``costeer eval``; docs/eval.md).

    from costeer.eval import project_set, evaluate
    summary = evaluate(project_set()[:5], "eval_out", ["llm", "slm+ctx", "costeer@T=3"], max_new_tokens=16)
"""
from .data import DataError, EvalItem, load_longlamp, project_set, read_items, read_longlamp_style, read_simple
from .metrics import GoldScorer, LikelihoodScorer, bootstrap_ci, derived_keywords, keyword_hits
from .retrieval import bm25_scores, top_k_records
from .runner import EvalError, System, default_systems, evaluate, read_results, write_report

__all__ = ["DataError", "EvalItem", "load_longlamp", "project_set", "read_items", "read_longlamp_style", "read_simple",
           "GoldScorer", "LikelihoodScorer", "bootstrap_ci", "derived_keywords", "keyword_hits", "bm25_scores",
           "top_k_records", "EvalError", "System", "default_systems", "evaluate", "read_results", "write_report"]
