"""Start-up of `costeer generate` / `costeer serve`: the cyclic GC is paused while the models load
(costeer/startup.py), only on the process's own command line, and is on again afterwards."""
import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest

from costeer import startup
from costeer.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _gc_restored():
    was = gc.isenabled()
    yield
    startup._paused = False
    gc.unfreeze()  # what resume_gc froze in this test process
    (gc.enable if was else gc.disable)()


def test_pause_and_resume():
    gc.enable()
    startup.pause_gc()
    assert not gc.isenabled()
    startup.pause_gc()  # twice: still one pause
    startup.resume_gc()
    assert gc.isenabled()
    gc.disable()
    startup.resume_gc()  # nothing paused any more: the program's own choice stays
    assert not gc.isenabled()
    startup.pause_gc()  # already off (the program's choice): resume must not turn it on
    startup.resume_gc()
    assert not gc.isenabled()


class _Stop(ValueError):
    pass


def _fake_generator(seen):
    class FakeGenerator:
        coverage = None
        llm_name = "fake"

        def __init__(self, *a, **k):
            seen.append(("load", gc.isenabled()))

        def stream(self, *a, **k):
            seen.append(("generate", gc.isenabled()))
            raise _Stop("stopped by the test")

    return FakeGenerator


GENERATE = ["generate", "--prompt", "Hi", "--context", "I like tea.", "--max-new-tokens", "1"]


def test_generate_command_line_pauses_gc_until_the_models_are_loaded(monkeypatch):
    import costeer.loop

    gc.enable()
    seen = []
    monkeypatch.setattr(costeer.loop, "Generator", _fake_generator(seen))
    monkeypatch.setattr(sys, "argv", ["costeer"] + GENERATE)
    assert cli_main() == 2  # the fake's generation error
    assert seen == [("load", False), ("generate", True)]
    assert gc.isenabled()


def test_main_called_with_arguments_keeps_the_gc_as_it_is(monkeypatch):
    import costeer.loop

    gc.enable()
    seen = []
    monkeypatch.setattr(costeer.loop, "Generator", _fake_generator(seen))
    assert cli_main(GENERATE) == 2
    assert seen == [("load", True), ("generate", True)]


def test_serve_command_line_resumes_gc_after_a_failed_load(monkeypatch):
    import costeer.models

    gc.enable()
    seen = []

    def failing_load(*a, **k):
        seen.append(gc.isenabled())
        raise costeer.models.ModelNotFoundError("no such model (test)")

    monkeypatch.setattr(costeer.models, "load_model", failing_load)
    monkeypatch.setattr(sys, "argv", ["costeer", "serve", "--host", "127.0.0.1", "--port", "0", "--model", "x"])
    assert cli_main() == 2
    assert seen == [False] and gc.isenabled()


def _run(code: str, **env):
    """``python -c code`` in a fresh process from the checkout (this environment plus ``env``)."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})


def test_importing_the_cli_imports_neither_torch_nor_transformers():
    """The pause covers the heavy imports only if they happen after `main()` starts: `costeer.cli`
    itself must stay light."""
    code = ("import sys, costeer.cli; heavy = [m for m in ('torch', 'transformers', 'numpy', 'costeer_kernels') "
            "if m in sys.modules]; print(heavy)")
    out = _run(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


_EXIT = ("import atexit, sys, threading\n"
         "from costeer.startup import exit_process\n"
         "atexit.register(lambda: print('handler ran', flush=True))\n"
         "sys.stdout.write('unflushed output'); sys.stderr.write('unflushed error')\n"
         "{extra}\n"
         "sys.exit(exit_process(3))\n")


def test_exit_process_runs_the_atexit_handlers_and_flushes():
    """The fast exit keeps what a normal exit guarantees: the status, the handlers, the buffered output."""
    res = _run(_EXIT.format(extra=""))
    assert res.returncode == 3
    assert res.stdout.startswith("unflushed output") and "handler ran" in res.stdout
    assert res.stderr == "unflushed error"


def test_exit_process_returns_while_a_thread_runs_or_when_asked():
    """Another thread alive (it may still be writing) or COSTEER_FULL_EXIT=1: the usual exit (the
    thread is waited for), the same status."""
    thread = ("import time; t = threading.Thread(target=lambda: (time.sleep(0.3), print('thread done', flush=True)));"
              " t.start()")
    res = _run(_EXIT.format(extra=thread))
    assert res.returncode == 3 and "thread done" in res.stdout and "handler ran" in res.stdout
    res = _run(_EXIT.format(extra=""), COSTEER_FULL_EXIT="1")
    assert res.returncode == 3 and "handler ran" in res.stdout
    res = _run("from costeer.startup import exit_process; import sys; sys.exit(exit_process('bad input'))")
    assert res.returncode == 1 and "bad input" in res.stderr


def test_python_m_costeer_exits_with_the_status():
    """``python -m costeer`` through console_main: a usage error's status 2, help's 0, output kept."""
    res = _run("import runpy, sys; sys.argv = ['costeer']; runpy.run_module('costeer', run_name='__main__')")
    assert res.returncode == 2 and "generate" in res.stdout
    res = _run("import runpy, sys; sys.argv = ['costeer', 'models', 'list']; runpy.run_module('costeer', run_name='__main__')")
    assert res.returncode == 0, res.stderr
