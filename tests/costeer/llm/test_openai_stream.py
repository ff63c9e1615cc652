"""The OpenAI-compatible stream's faults against an endpoint on loopback that behaves as vLLM does
when things go wrong: it closes idle keep-alive connections without saying so, answers 503 while it
restarts, errors, stalls, or answers nonsense. The logprobs themselves come from the real model.
(The same stream against a real vLLM server: tests/costeer/llm/test_vllm_server.py.)"""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from costeer import Generator, StreamError
from costeer.cli import main as cli_main
from costeer.llm import OpenAICompletionsStream

PROMPT, CONTEXT = "What should I cook tonight?", "I am vegan and allergic to peanuts."
MODEL = "fake-vllm"


class Endpoint:
    """``/v1/models`` + ``/v1/completions`` (vLLM's answer format) on 127.0.0.1.

    ``close_after_answer``: close the connection after every answer WITHOUT a ``Connection: close``
    header, as vLLM does to a keep-alive connection left idle for 5 s: the client only learns it when
    it reuses the connection. ``script``: answers to give before the real ones ("503", "500", "401",
    "garbage", "no-logprobs", "event-without-top", "cut-stream", ("sleep", s)).
    """

    def __init__(self, model):
        self.model, self.seen, self.headers, self.script = model, [], [], []
        self.short_rows = {}  # choice index -> tokens it answers at most (an engine ending a row at its EOS)
        self.close_after_answer = False
        self.connections = set()
        ep = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _send(self, status, payload):
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                self.wfile.flush()
                if ep.close_after_answer:
                    self.close_connection = True

            def do_GET(self):
                ep.headers.append(dict(self.headers))
                if self.path != "/v1/models":
                    return self._send(404, {"error": {"message": "not found"}})
                self._send(200, {"object": "list", "data": [{"id": MODEL, "max_model_len": 256}]})

            def do_POST(self):
                ep.connections.add(self.client_address)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                ep.seen.append(body)
                ep.headers.append(dict(self.headers))
                action = ep.script.pop(0) if ep.script else None
                if isinstance(action, tuple) and action[0] == "sleep":
                    time.sleep(action[1])
                elif action in ("503", "500", "401"):
                    return self._send(int(action), {"error": {"message": f"scripted {action}"}})
                elif action == "garbage":
                    return self._send(200, b"<html>not json</html>")
                elif action == "no-logprobs":
                    return self._send(200, {"choices": [{"index": 0, "text": "x"}]})
                elif action == "event-without-top":  # a server-sent event whose logprobs lack the top k
                    self._send_events(b'data: {"choices": [{"index": 0, "logprobs": {"tokens": ["token_id:5"]}}]}\n\n')
                    return
                if body["model"] != MODEL:
                    return self._send(404, {"error": {"message": f"The model `{body['model']}` does not exist."}})
                answer = ep.answer(body)
                if not body.get("stream"):
                    return self._send(200, answer)
                # server-sent events as vLLM streams a completion: one event per token and choice
                events = []
                for c in answer["choices"]:
                    lp = c["logprobs"]
                    for t, (tok, top) in enumerate(zip(lp["tokens"], lp["top_logprobs"])):
                        last = t == len(lp["tokens"]) - 1
                        events.append((t, {"choices": [{"index": c["index"], "text": "", "finish_reason":
                                                        ("length" if last else None),
                                                        "logprobs": {"tokens": [tok], "top_logprobs": [top]}}]}))
                events.sort(key=lambda e: e[0])
                data = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for _, e in events) + b"data: [DONE]\n\n"
                if action == "cut-stream":  # the engine goes away mid-answer: half the events, then the close
                    self._send_events(data, data[: data.index(b"data:", len(data) // 2)])
                    self.close_connection = True
                    return
                self._send_events(data)

            def _send_events(self, data, sent=None):
                """A server-sent-events answer announcing ``data``; ``sent`` (default all) is what is written."""
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data if sent is None else sent)
                self.wfile.flush()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def answer(self, body):
        """vLLM's answer: top-k of the next token (and ``prompt_logprobs`` entries with ranks)."""
        choices = []
        for i, p in enumerate(body["prompt"]):
            with torch.inference_mode():
                lp = torch.log_softmax(self.model.model(torch.tensor([p])).logits[0].float(), -1)
            toks, tops, seq, last = [], [], list(p), lp[-1]
            n = min(body.get("max_tokens", 1), self.short_rows.get(i, 10**9))
            for t in range(n):  # greedy, as temperature 0 asks; max_tokens > 1: the cloud drafts
                if t:
                    with torch.inference_mode():
                        last = torch.log_softmax(self.model.model(torch.tensor([seq])).logits[0, -1].float(), -1)
                v, ix = torch.topk(last, body["logprobs"])
                tops.append({f"token_id:{int(x)}": float(y) for x, y in zip(ix, v)})
                toks.append(f"token_id:{int(ix[0])}")
                seq.append(int(ix[0]))
            c = {"index": i, "text": "", "logprobs": {"tokens": toks, "top_logprobs": tops}}
            if body.get("prompt_logprobs"):
                k = body["prompt_logprobs"]
                entries = [None]
                for j in range(1, len(p)):
                    order = torch.argsort(lp[j - 1], descending=True)
                    rank = {int(t): r + 1 for r, t in enumerate(order[: k].tolist())}
                    e = {str(t): {"logprob": float(lp[j - 1, t]), "rank": r} for t, r in rank.items()}
                    if p[j] not in rank:  # vLLM adds the prompt's own token with its rank
                        e[str(p[j])] = {"logprob": float(lp[j - 1, p[j]]),
                                        "rank": int((lp[j - 1] > lp[j - 1, p[j]]).sum()) + 1}
                    entries.append(e)
                c["prompt_logprobs"] = entries
            choices.append(c)
        return {"choices": choices, "usage": {"prompt_tokens": sum(map(len, body["prompt"]))}}

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def endpoint(smol):
    ep = Endpoint(smol)
    yield ep
    ep.stop()


@pytest.fixture(scope="module")
def inproc(smol):
    return Generator(llm=smol, slm=smol)


def _stream(ep, **kw):
    kw.setdefault("vocab_size", 49152)
    return OpenAICompletionsStream(ep.url, model=MODEL, **kw)


def test_keepalive_close_between_steps_is_retried(endpoint, smol, inproc):
    """The issue's failure: the server closes the idle connection, the next step must not die with it."""
    endpoint.close_after_answer = True
    stream = _stream(endpoint, k=20, backoff=0.01)
    g = Generator(llm=None, slm=smol, llm_stream=stream, cfg=inproc.cfg)
    res = g.generate(PROMPT, context=CONTEXT, max_new_tokens=6, mode="llm")
    ref = inproc.generate(PROMPT, context=CONTEXT, max_new_tokens=6, mode="llm")
    assert res.finish_reason != "error" and res.token_ids == ref.token_ids
    assert stream.reconnects >= len(res.token_ids) - 1  # every step after the first found its connection closed
    # the server saw each step's request once (a resend only follows a request it never read), each on a new connection
    prompts = [json.dumps(b["prompt"]) for b in endpoint.seen]
    assert len(set(prompts)) == len(prompts) == len(res.token_ids)
    assert len(endpoint.connections) == len(res.token_ids)


def test_restarting_engine_503_is_retried_then_errors_are_clear(endpoint):
    s = _stream(endpoint, k=5, backoff=0.01)
    endpoint.script = ["503", "503"]
    s.open([[1, 2, 3]])
    assert s.recv().logits.shape == (1, 49152) and s.reconnects == 2
    for action, match in (("500", r"answered HTTP 500: scripted 500"), ("401", r"HTTP 401.*--api-key"),
                          ("garbage", "malformed answer"), ("no-logprobs", "no top logprobs")):
        endpoint.script = [action]
        s.send([5])
        with pytest.raises(StreamError, match=match) as info:
            s.recv()
        assert endpoint.url + "/v1/completions" in str(info.value)
    s.close()


def test_bounded_backoff_when_the_engine_stays_away(endpoint):
    s = _stream(endpoint, k=5, reconnect_timeout=0.5, backoff=0.05)
    endpoint.close_after_answer = True  # then the engine goes away: every reconnect is refused
    s.open([[1, 2, 3]])
    s.recv()
    endpoint.stop()
    s.send([7])
    t0 = time.monotonic()
    with pytest.raises(StreamError, match=r"got no answer within 0.5 s \(\d+ attempts\)"):
        s.recv()
    assert time.monotonic() - t0 < 5.0
    with pytest.raises(StreamError, match="cannot reach the completions endpoint"):
        _stream(endpoint, k=5)


def test_slow_answer_times_out_with_the_url(endpoint):
    s = _stream(endpoint, k=5, timeout=0.3)
    endpoint.script = [("sleep", 1.0)]
    s.open([[1, 2, 3]])
    with pytest.raises(StreamError, match=r"no answer from http://127\.0\.0\.1:\d+/v1/completions within 0.3 s"):
        s.recv()


def test_models_endpoint_gives_max_len_and_checks_the_name(endpoint):
    s = _stream(endpoint, k=5)
    assert s.max_len == 256
    with pytest.raises(ValueError, match="window is 256"):
        s.open([[1] * 256])
    s.open([[1] * 254])
    s.recv()
    s.send([2])
    s.recv()  # 255 tokens + the answer's one = the window
    with pytest.raises(ValueError, match="max_len of 256"):
        s.send([3])
    with pytest.raises(StreamError, match=r"does not serve a model named 'other'.*fake-vllm"):
        OpenAICompletionsStream(endpoint.url, model="other", vocab_size=49152)
    assert OpenAICompletionsStream(endpoint.url, model="other", vocab_size=49152, max_len=None).max_len is None
    for bad in (dict(max_len=1), dict(timeout=0), dict(reconnect_timeout=-1), dict(api_key=""), dict(k=0),
                dict(score="echo")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            _stream(endpoint, **bad)


def test_batch_in_one_request(endpoint, smol):
    s = _stream(endpoint, k=5)
    s.open([[1, 2, 3], [4, 5, 6, 7]])
    a = s.recv()
    s.send([10, 11])
    b = s.recv()
    assert len(endpoint.seen) == 2 and endpoint.seen[1]["prompt"] == [[1, 2, 3, 10], [4, 5, 6, 7, 11]]
    assert a.logits.shape == b.logits.shape == (2, 49152)
    with torch.inference_mode():
        want = smol.model(torch.tensor([[4, 5, 6, 7, 11]])).logits[0, -1].argmax()
    assert int(b.logits[1].argmax()) == int(want)
    assert b.roundtrip_s > 0 and b.compute_s == 0.0  # this endpoint reports no engine time


@pytest.mark.parametrize("score", ["prompts", "prompt_logprobs"])
def test_score_matches_one_step_at_a_time(endpoint, score):
    """Scoring n appended tokens in one request gives what single steps give, top k only: one prompt
    per appended token, or prompt_logprobs over the whole sequence (vLLM's extra prompt token dropped)."""
    s = _stream(endpoint, k=5, score=score)
    s.open([[1, 2, 3]])
    s.recv()
    s.score_send([[40, 41, 42]], rollback=0)
    scored = s.score_recv(3).logits
    if score == "prompts":
        assert endpoint.seen[-1]["prompt"] == [[1, 2, 3, 40], [1, 2, 3, 40, 41], [1, 2, 3, 40, 41, 42]]
        assert "prompt_logprobs" not in endpoint.seen[-1]
    else:
        assert endpoint.seen[-1]["prompt"] == [[1, 2, 3, 40, 41, 42]] and endpoint.seen[-1]["prompt_logprobs"] == 5
    s.score_send([[50, 51]], rollback=2)  # drops 41, 42
    assert s.score_recv(2).logits.shape == (2, 49152)
    assert endpoint.seen[-1]["prompt"][-1] == [1, 2, 3, 40, 50, 51]
    steps = []
    for prefix in ([1, 2, 3, 40], [1, 2, 3, 40, 41], [1, 2, 3, 40, 41, 42]):
        s.open([prefix])
        steps.append(s.recv().logits[0])
    assert torch.isfinite(scored).sum(-1).tolist() == [5, 5, 5]
    torch.testing.assert_close(scored, torch.stack(steps))
    with pytest.raises(ValueError, match="rollback"):
        s.score_send([[1]], rollback=99)


@pytest.mark.parametrize("streamed", [True, False])
def test_draft_is_the_engines_greedy_continuation(endpoint, streamed):
    """draft_send / draft_recv: one max_tokens=n request; the tokens are the engine's greedy ones, row
    i is what one step after the first i - 1 of them gives, the sequence keeps n - 1 of them (the
    next request's rollback drops the rejected), and a row the engine ended early cuts the round."""
    s = _stream(endpoint, k=5, stream_drafts=streamed)
    s.open([[1, 2, 3], [7, 8, 9]])
    first = s.recv().logits
    s.draft_send([40, 41], 3)
    with pytest.raises(RuntimeError, match="draft"):
        s.recv()
    d = s.draft_recv(3)
    assert endpoint.seen[-1]["max_tokens"] == 3 and endpoint.seen[-1]["prompt"] == [[1, 2, 3, 40], [7, 8, 9, 41]]
    assert endpoint.seen[-1].get("stream", False) is streamed
    assert d.tokens.shape == (2, 3) and d.logits.shape == (6, 49152)
    assert first.shape == (2, 49152)
    steps = []
    for b, x in enumerate((40, 41)):
        seq = [[1, 2, 3], [7, 8, 9]][b] + [x]
        for i in range(3):
            s2 = _stream(endpoint, k=5)
            s2.open([seq])
            row = s2.recv().logits[0]
            steps.append(row)
            assert int(row.argmax()) == int(d.tokens[b, i])
            seq = seq + [int(d.tokens[b, i])]
    torch.testing.assert_close(d.logits, torch.stack(steps))
    endpoint.short_rows = {1: 2}
    s.draft_send([50, 51], 4, rollback=1)  # drops the second drafted token of each row
    kept = [[1, 2, 3, 40, int(d.tokens[0, 0])], [7, 8, 9, 41, int(d.tokens[1, 0])]]
    d2 = s.draft_recv(4)
    assert endpoint.seen[-1]["prompt"] == [kept[0] + [50], kept[1] + [51]]
    assert d2.tokens.shape == (2, 2) and d2.logits.shape == (4, 49152)
    assert s._prompts == [kept[0] + [50, int(d2.tokens[0, 0])], kept[1] + [51, int(d2.tokens[1, 0])]]
    endpoint.short_rows = {1: 1}  # a row whose generation ended (fed its EOS): the engine ends it at once
    s.draft_send([60, 61], 3, live=[True, False])
    d3 = s.draft_recv(3)
    assert d3.tokens.shape == (2, 3) and d3.logits.shape == (6, 49152)  # the dead row does not cut the round
    assert torch.equal(d3.tokens[1], d3.tokens[0]) and torch.equal(d3.logits[3:], d3.logits[:3])  # filler
    with pytest.raises(ValueError, match="live"):
        s.draft_send([1, 2], 2, live=[False, False])
    with pytest.raises(ValueError, match="one token id per row"):
        s.draft_send([1], 2)
    with pytest.raises(ValueError, match="n must be"):
        s.draft_send([1, 2], 0)
    s.open([[1, 2, 3]])
    s.recv()
    endpoint.script = ["no-logprobs"]
    s.draft_send([4], 2)
    with pytest.raises(StreamError, match="top logprobs per generated token" if not streamed else "without server-sent events"):
        s.draft_recv(2)
    if streamed:
        s.open([[1, 2, 3]])
        s.recv()
        endpoint.script = ["event-without-top"]
        s.draft_send([4], 2)
        with pytest.raises(StreamError, match="streamed no tokens and top logprobs per generated token"):
            s.draft_recv(2)


def test_streamed_draft_cut_mid_answer_is_requested_again(endpoint):
    """The engine closes the connection half-way through a streamed draft: the stream sends the request
    again, checks the positions it already yielded against the new answer and goes on; with
    reconnects off the cut is a StreamError naming the URL."""
    s = _stream(endpoint, k=5)
    s.open([[1, 2, 3], [7, 8, 9]])
    s.recv()
    s.draft_send([40, 41], 4)
    want = s.draft_recv(4)
    s.open([[1, 2, 3], [7, 8, 9]])
    s.recv()
    endpoint.script = ["cut-stream"]
    s.draft_send([40, 41], 4)
    got = list(s.draft_iter(4))
    assert s.reconnects == 1 and len(got) == 4
    assert torch.equal(torch.stack([g[0] for g in got], 1), want.tokens)
    torch.testing.assert_close(torch.stack([g[1].logits for g in got], 1).reshape(8, -1), want.logits)
    assert s._prompts[0] == [1, 2, 3, 40] + want.tokens[0, :3].tolist()
    s2 = _stream(endpoint, k=5, reconnect_timeout=0)
    s2.open([[1, 2, 3]])
    s2.recv()
    endpoint.script = ["cut-stream"]
    s2.draft_send([40], 4)
    with pytest.raises(StreamError, match="while it streamed a draft"):
        s2.draft_recv(4)


def test_cloud_drafted_generation_streams_and_cuts_at_the_first_rejection(endpoint, smol):
    """Generator with Speculation(proposal="cloud") through the endpoint: streamed max_tokens=k+1
    requests; greedy output equals the normal loop's through the same endpoint; a round whose draft
    is rejected early is cut there (its connection dropped: the engine stops decoding it), so some
    round uses fewer than k + 1 positions, and the rollback rides on the next request."""
    from costeer.speculative import Speculation

    g = Generator(llm=None, slm=smol, llm_url=endpoint.url, remote_model=MODEL, topk=20)
    normal = g.generate(PROMPT, context=CONTEXT, max_new_tokens=16)
    n0 = len(endpoint.seen)
    spec = g.generate(PROMPT, context=CONTEXT, max_new_tokens=16, speculative=Speculation(4, proposal="cloud"))
    assert spec.finish_reason != "error", spec.error
    assert spec.token_ids == normal.token_ids, (spec.text, normal.text)
    sent = endpoint.seen[n0:]
    assert len(sent) == spec.llm_calls and all(b["stream"] is True for b in sent[1:])
    assert all(b["max_tokens"] == 5 for b in sent[1:-1])
    assert any(k < 4 for k in spec.ks[:-1]), spec.ks  # a cut round (SmolLM2 steered disagrees with its greedy)
    pub = sent[0]["prompt"][0]
    for body in sent[1:]:  # each request holds exactly the emitted text: the rejected drafts rolled back
        p = body["prompt"][0]
        assert p == pub + spec.token_ids[:len(p) - len(pub)]
    # a batch whose second request stops early (a stop string): its finished row is marked dead, so
    # the engine ending that row at once does not shorten the first request's rounds
    from costeer import Request

    word = normal.text.split()[2]
    reqs = [Request(prompt=PROMPT, context=CONTEXT), Request(prompt=PROMPT, context=CONTEXT, stop=[word])]
    want = g.generate(reqs, max_new_tokens=16)
    endpoint.short_rows = {1: 1}
    got = g.generate(reqs, max_new_tokens=16, speculative=Speculation(4, proposal="cloud"))
    assert [r.token_ids for r in got] == [r.token_ids for r in want] and got[1].finish_reason == "stop"
    assert got[0].token_ids == normal.token_ids and got[0].rounds < len(got[0].token_ids) - 1


def test_api_key_from_cli_and_environment(endpoint, smol, monkeypatch, tmp_path):
    ctx = tmp_path / "ctx.txt"
    ctx.write_text(CONTEXT)
    rc = cli_main(["generate", "--prompt", PROMPT, "--context-file", str(ctx), "--llm-url", endpoint.url,
                   "--remote-model", MODEL, "--max-new-tokens", "2", "--api-key", "sk-from-cli", "--quiet"])
    assert rc == 0 and endpoint.headers and all(h.get("Authorization") == "Bearer sk-from-cli" for h in endpoint.headers)
    endpoint.headers.clear()
    monkeypatch.delenv("COSTEER_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    _stream(endpoint).close()
    monkeypatch.setenv("COSTEER_API_KEY", "sk-costeer")
    _stream(endpoint).close()
    assert [h.get("Authorization") for h in endpoint.headers] == ["Bearer sk-openai", "Bearer sk-costeer"]


@pytest.mark.parametrize("score", ["prompts", "prompt_logprobs"])
def test_cli_score_mode_reaches_the_speculative_requests(endpoint, tmp_path, score):
    ctx = tmp_path / "ctx.txt"
    ctx.write_text(CONTEXT)
    rc = cli_main(["generate", "--prompt", PROMPT, "--context-file", str(ctx), "--llm-url", endpoint.url,
                   "--remote-model", MODEL, "--max-new-tokens", "6", "--speculative", "2", "--score", score, "--quiet"])
    rounds = endpoint.seen[1:]  # after the first step's request
    assert rc == 0 and rounds
    if score == "prompts":
        assert all("prompt_logprobs" not in b and len(b["prompt"]) > 1 for b in rounds)
    else:
        assert all(b.get("prompt_logprobs") == 20 and len(b["prompt"]) == 1 for b in rounds)
