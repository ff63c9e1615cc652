"""Start-up of the ``costeer generate`` and ``costeer serve`` processes: the cyclic garbage collector
is paused until the models are loaded.

A warm start imports about 3,300 modules (torch, transformers' modeling code and what it pulls in)
and creates about a million long-lived objects. With the collector on, a thousand collections run
during one start, six of them over every object (on a 2-core machine, 0.7-0.9 s of a 5-6 s warm
``costeer generate`` start; bench/RESULTS.md, "Start-up"). Almost none of those objects is garbage
in a reference cycle (about 10,000 of the million; reference counting frees everything else as
usual), so the process pauses the collector (``gc.disable``) and, once the models are loaded,
moves every object alive then to the permanent generation (``gc.freeze``: later collections skip
them, which also keeps the long-running server's collections short; one full collection instead
would cost about 0.45 s here) and turns the collector back on. At exit the frozen objects go back
to the collector (``gc.unfreeze``), so that its last pass frees the cycles among them (a native
extension such as triton's reports instances still alive at exit otherwise). A first start that
builds a model cache entry collects once after the build (``costeer/model_cache.py``), so the
de-quantized model it dropped is not frozen.

Only the process's own command line does this (``costeer.cli.main()`` called without ``argv``):
a program or test that calls ``main([...])`` keeps its collector as it is.
"""
from __future__ import annotations

import atexit
import gc

_paused = False


def pause_gc() -> None:
    """Pause the cyclic collector for the start-up (no-op when it is already off)."""
    global _paused
    if gc.isenabled() and not _paused:
        gc.disable()
        _paused = True


def resume_gc() -> None:
    """The models are loaded (or the start failed): freeze what is alive, collector on again. Only
    when ``pause_gc`` turned it off; calling it again does nothing."""
    global _paused
    if _paused:
        _paused = False
        gc.freeze()
        atexit.register(gc.unfreeze)
        gc.enable()
