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

The exit. After a run, the interpreter's own teardown (clearing ~3,300 modules and the final
collection over the million objects) took 1.5-1.7 s of wall time on the 2-core AMD EPYC, after the
answer was printed. ``exit_process`` (the ``costeer`` script and ``python -m costeer``, after a
normal return) runs the ``atexit`` handlers, flushes stdout and stderr and ends the process with
``os._exit``, skipping that teardown; nothing of ours needs it (files are closed by their
``with`` blocks, locks released, logging flushed by its handler). While another thread is still
running, or when ``COSTEER_FULL_EXIT=1``, it returns the code instead for the usual exit.
"""
from __future__ import annotations

import atexit
import gc
import os
import sys
import threading

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


def exit_process(code) -> int:
    """End this process now with ``code`` (an int; None is 0), after the ``atexit`` handlers and a
    flush of stdout and stderr, without the interpreter's teardown. Returns ``code`` (for
    ``sys.exit``) where it does not exit: not an int, another thread alive, ``COSTEER_FULL_EXIT=1``."""
    code = 0 if code is None else code
    if (not isinstance(code, int) or isinstance(code, bool) or threading.active_count() > 1
            or os.environ.get("COSTEER_FULL_EXIT", "") not in ("", "0")):
        return code  # sys.exit's usual path (a message string, a thread still running, asked for)
    try:
        atexit._run_exitfuncs()  # what a normal exit runs first (CPython's own API for it)
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # a closed or broken pipe: nothing more can be written anyway
                pass
        os._exit(code & 0xFF)
