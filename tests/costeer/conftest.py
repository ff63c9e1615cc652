"""Fixtures: the real SmolLM2 model (loaded once per session) and a real `costeer serve` process."""
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def smol():
    from costeer.models import load_model

    try:
        return load_model("smollm2")
    except Exception as exc:  # pragma: no cover
        pytest.skip(f"embedded model unavailable: {exc}")


class _Server:
    def __init__(self, proc, url, record):
        self.proc, self.url, self.record = proc, url, record


@pytest.fixture(scope="session")
def server(tmp_path_factory, smol):  # smol: skips when the embedded model is not installed
    """`python -m costeer serve` on 127.0.0.1 (free port), recording every received frame."""
    record = str(tmp_path_factory.mktemp("serve") / "received.jsonl")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-m", "costeer", "serve", "--host", "127.0.0.1", "--port", "0", "--record", record,
         "--max-prompt-tokens", "512"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=ROOT)
    url = None
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                if proc.poll() is not None:
                    break
                continue
            if "listening on ws://" in line:
                url = line.strip().split("listening on ")[1]
                break
        if url is None:
            pytest.fail("costeer serve did not start")
        yield _Server(proc, url, record)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama with the real SmolLM2 tokenizer (tests/costeer/tiny.py), saved once."""
    from tests.costeer.tiny import make_tiny_model

    try:
        return make_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"))
    except Exception as exc:  # pragma: no cover
        pytest.skip(f"tiny model unavailable (needs the embedded tokenizer): {exc}")


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    from costeer.models import load_model

    return load_model(tiny_dir)
