"""Start-up of the ``costeer generate`` and ``costeer serve`` processes: the cyclic garbage collector
is paused until the models are loaded.

A warm start imports about 3,300 modules (torch, transformers' modeling code and what it pulls in)
and creates about a million long-lived objects. With the collector on, every generation-2
collection walks all of them again (six of them, and a thousand younger ones, in one start); on a
2-core machine that was about a fifth of the CPU time of a warm ``costeer generate`` start
(bench/RESULTS.md, "Start-up"). Almost nothing built during start-up is garbage in a reference
cycle (about 10,000 objects among the million), and reference counting frees everything else as
usual, so the process pauses the collector (``gc.disable``) and, once the models are loaded, runs
one full collection (so no cycle made during the start, such as a de-quantized model of a first
build, outlives it) and turns the collector back on: from then on it runs as in any Python process.

Only the process's own command line does this (``costeer.cli.main()`` called without ``argv``):
a program or test that calls ``main([...])`` keeps its collector as it is.
"""
from __future__ import annotations

import gc

_paused = False


def pause_gc() -> None:
    """Pause the cyclic collector for the start-up (no-op when it is already off)."""
    global _paused
    if gc.isenabled() and not _paused:
        gc.disable()
        _paused = True


def resume_gc() -> None:
    """The models are loaded (or the start failed): one full collection, then the collector is on
    again. Only when ``pause_gc`` turned it off; calling it again does nothing."""
    global _paused
    if _paused:
        _paused = False
        gc.collect()
        gc.enable()
