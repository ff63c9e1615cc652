"""Faults: `costeer serve` killed (SIGKILL) mid-generation and restarted on the same port; the
client reconnects with bounded backoff and resumes from its token prefix, ending with the output of
an uninterrupted run. `costeer generate --output FILE` keeps every token; `--resume` continues it,
also after the generating process itself was killed."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from costeer import Generator
from costeer.cli import CLI_DEFAULTS
from costeer.cli import main as cli_main
from costeer_kernels import SteerConfig
from tests.costeer.conftest import ROOT
from tests.costeer.tiny import free_port

PROMPT, CONTEXT = "Suggest a weekend activity.", "I love hiking and I live in Zurich."
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), TOKENIZERS_PARALLELISM="false")


class Served:
    """`python -m costeer serve --model TINY` on a fixed loopback port, killable and restartable."""

    def __init__(self, model_dir, port):
        self.model_dir, self.port, self.proc = model_dir, port, None
        self.url = f"ws://127.0.0.1:{port}"
        self.starts = self.kills = 0

    def start(self, wait=True):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "costeer", "serve", "--model", self.model_dir, "--host", "127.0.0.1",
             "--port", str(self.port), "--threads", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ENV, cwd=ROOT)
        self.starts += 1
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if "listening on ws://" in line:
                return
            if not line and self.proc.poll() is not None:
                break
        raise RuntimeError("costeer serve did not start")

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.kills += 1

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


@pytest.fixture(scope="module")
def served(tiny_dir):
    s = Served(tiny_dir, free_port())
    s.start()
    yield s
    s.stop()


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_server_killed_twice_mid_generation_resumes(served, tiny):
    cfg = SteerConfig(**CLI_DEFAULTS)
    gen = Generator(llm=None, slm=tiny, llm_url=served.url, cfg=cfg, transport_dtype="float32",
                    reconnect_timeout=120)
    ref = gen.generate(PROMPT, context=CONTEXT, max_new_tokens=30)
    assert len(ref.token_ids) == 30
    kill_at = {8: None, 19: None}
    tokens, text = [], []
    t0 = time.time()
    for chunk in gen.stream(PROMPT, context=CONTEXT, max_new_tokens=30):
        text.append(chunk.text)
        if chunk.token is not None:
            tokens.append(chunk.token)
        if len(tokens) in kill_at and kill_at[len(tokens)] is None:
            served.kill()  # mid-generation: the next request finds no server
            kill_at[len(tokens)] = threading.Timer(0.1, served.start)  # back after ~5 s of retries
            kill_at[len(tokens)].start()
        if chunk.done:
            res = chunk.result
    for t in kill_at.values():
        t.join()
    assert tokens == ref.token_ids and res.token_ids == ref.token_ids
    assert res.text == ref.text == "".join(text) and res.finish_reason == ref.finish_reason
    assert gen.connection.reconnects == 2 and served.kills == 2
    print(f"2 kills survived; generation with two restarts took {time.time() - t0:.1f} s")
    gen.close()


class _KillingStdout:
    """sys.stdout that SIGKILLs the server once `after` text pieces were printed."""

    def __init__(self, served, after):
        self.served, self.after, self.n, self.parts = served, after, 0, []

    def write(self, s):
        self.parts.append(s)
        self.n += 1
        if self.n == self.after:
            self.served.kill()
        return len(s)

    def flush(self):
        pass


def test_cli_output_keeps_text_when_reconnect_fails_and_resume_completes(served, tiny_dir, tmp_path, monkeypatch,
                                                                        capsys, keep_threads):
    args = ["generate", "--llm-url", served.url, "--slm", tiny_dir, "--prompt", PROMPT, "--context", CONTEXT,
            "--max-new-tokens", "40", "--dtype", "float32", "--threads", "1", "--quiet"]
    ref = tmp_path / "ref.txt"
    assert cli_main(args + ["--output", str(ref)]) == 0
    out = tmp_path / "out.txt"
    monkeypatch.setattr(sys, "stdout", _KillingStdout(served, after=12))
    rc = cli_main(args + ["--output", str(out), "--reconnect-timeout", "1"])
    monkeypatch.undo()
    assert rc == 1  # the server stayed down longer than the reconnect budget
    err = capsys.readouterr().err
    assert "could not reconnect within 1 s" in err and "--resume" in err
    partial = out.read_text(encoding="utf-8")
    tokens = [json.loads(line) for line in (tmp_path / "out.txt.journal").read_text().splitlines()[1:]]
    assert partial and 10 <= len(tokens) < 40 and "done" not in tokens[-1]
    assert ref.read_text(encoding="utf-8").startswith(partial)  # nothing lost, nothing invented
    # a second run without --resume refuses to overwrite
    assert cli_main(args + ["--output", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    # with other settings, --resume refuses
    served.start()
    assert cli_main(args + ["--output", str(out), "--resume", "--T", "5"]) == 2
    assert "another prompt" in capsys.readouterr().err
    assert cli_main(args + ["--output", str(out), "--resume"]) == 0
    assert out.read_text(encoding="utf-8") == ref.read_text(encoding="utf-8")
    assert capsys.readouterr().out.strip() == ref.read_text(encoding="utf-8").strip()
    assert cli_main(args + ["--output", str(out), "--resume"]) == 0  # already complete: a no-op
    assert out.read_text(encoding="utf-8") == ref.read_text(encoding="utf-8")


def test_generating_process_killed_then_resumed(tiny_dir, tmp_path, keep_threads, capsys):
    args = ["generate", "--llm", tiny_dir, "--slm", tiny_dir, "--prompt", PROMPT, "--context", CONTEXT,
            "--max-new-tokens", "120", "--threads", "1", "--quiet"]
    ref = tmp_path / "ref.txt"
    assert cli_main(args + ["--output", str(ref)]) == 0
    out = tmp_path / "out.txt"
    journal = tmp_path / "out.txt.journal"
    proc = subprocess.Popen([sys.executable, "-m", "costeer"] + args + ["--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_text().count("\n") > 15:
            proc.send_signal(signal.SIGKILL)  # the generating process dies mid-generation
            break
        time.sleep(0.005)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, "the generation finished before it could be killed"
    n = journal.read_text().count("\n") - 1
    assert 15 <= n < 120
    # as if it died between writing text and its journal line, and half-way through a line
    with open(out, "ab") as f:
        f.write("text that was written but never journaled".encode())
    with open(journal, "a") as f:
        f.write('{"t": 12')
    assert cli_main(args + ["--output", str(out), "--resume"]) == 0
    assert out.read_text(encoding="utf-8") == ref.read_text(encoding="utf-8")
    lines = journal.read_text().splitlines()
    assert json.loads(lines[-1]) == {"done": "length"} and len(lines) == 1 + 1 + 120 + 1  # header, llm, tokens, done
    capsys.readouterr()


def test_generator_prefix_resumes_exactly(tiny):
    gen = Generator(llm=tiny, slm=tiny, cfg=SteerConfig(**CLI_DEFAULTS))
    for kw in ({}, {"temperature": 0.9, "top_p": 0.9, "seed": 7}):
        ref = gen.generate(PROMPT, context=CONTEXT, max_new_tokens=16, **kw)
        for k in (1, 9):
            res = gen.generate(PROMPT, context=CONTEXT, max_new_tokens=16, prefix=[ref.token_ids[:k]], **kw)
            assert res.token_ids == ref.token_ids and res.text == ref.text, (kw, k)
    with pytest.raises(ValueError, match="prefix must be a list of 1"):
        gen.generate(PROMPT, prefix=[[1], [2]])
    with pytest.raises(ValueError, match="outside"):
        gen.generate(PROMPT, prefix=[[tiny.vocab_size]])
    with pytest.raises(ValueError, match="end-of-sequence"):
        gen.generate(PROMPT, prefix=[[tiny.eos_token_ids[0]]])
