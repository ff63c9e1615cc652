"""A real `costeer serve` process on 127.0.0.1: privacy of the context, equality with in-process
generation, protocol robustness and limits."""
import base64
import json

import pytest

from costeer import Generator, StreamError
from costeer.serve import protocol as P
from costeer.cli import CLI_DEFAULTS
from costeer_kernels import SteerConfig

SECRET = "Zorblax-4471-Quenvik"
CONTEXT = f"My bank PIN hint is {SECRET}. I love hiking and I live in Zurich."
PROMPT = "Suggest a weekend activity."


def _received(record):
    frames, tokens = [], []
    with open(record, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r["kind"] == "frame":
                frames.append(base64.b64decode(r["bytes_b64"]))
            else:
                tokens.append(r["tokens"])
    return frames, tokens


def _contains(seq, sub):
    n = len(sub)
    return n > 0 and any(seq[i:i + n] == sub for i in range(len(seq) - n + 1))


def test_secret_never_reaches_the_server(server, smol):
    # Only this test's frames: other tests share the server (speculative steering, which sends
    # drafts by design, may run before this one).
    open(server.record, "w").close()
    cfg = SteerConfig(**CLI_DEFAULTS)
    gen = Generator(llm=None, slm=smol, llm_url=server.url, cfg=cfg, transport_dtype="float32")
    res = gen.generate(PROMPT, context=CONTEXT, max_new_tokens=10)
    assert res.token_ids and SECRET not in res.text
    frames, tokens = _received(server.record)
    assert frames and tokens
    blob = b"".join(frames)
    tok = smol.tokenizer
    for s in (SECRET, SECRET.lower(), "Zorblax", "Quenvik", "4471", CONTEXT):
        assert s.encode("utf-8") not in blob
        assert s.encode("utf-16-le") not in blob
    stream = [t for ts in tokens for t in ts]
    for variant in (SECRET, " " + SECRET, CONTEXT, "Zorblax", " Zorblax", "Quenvik"):
        ids = tok(variant, add_special_tokens=False)["input_ids"]
        assert not _contains(stream, ids), variant
    # Everything the server got is the public prompt and the chosen tokens, nothing else.
    from costeer.loop import chat_ids

    public = chat_ids(tok, PROMPT)
    assert public in tokens
    assert all(len(t) == 1 for t in tokens if t != public)  # steps carry one chosen token each


def test_served_generation_equals_in_process(server, smol):
    cfg = SteerConfig(**CLI_DEFAULTS)
    local = Generator(llm=smol, slm=smol, cfg=cfg)
    remote = Generator(llm=None, slm=smol, llm_url=server.url, cfg=cfg, transport_dtype="float32")
    prompts = [("What should I cook tonight?", "I am vegan and allergic to peanuts."),
               ("Recommend a book for me.", "My favourite genre is science fiction; I enjoyed Dune.")]
    connection = remote.connection
    for p, c in prompts:
        a = local.generate(p, context=c, max_new_tokens=10)
        b = remote.generate(p, context=c, max_new_tokens=10)
        assert remote.connection is connection and connection.reusable  # one persistent connection
        assert a.token_ids == b.token_ids
        s = b.timing_summary()
        assert s["transport_ms"] >= 0 and s["local_ms"] > 0
    # top-k answers (restrict policy): the LLM alone decodes greedily the same way
    topk = Generator(llm=None, slm=smol, llm_url=server.url, cfg=cfg, response_format="topk", topk=5)
    p, c = prompts[0]
    assert topk.generate(p, context=c, max_new_tokens=8, mode="llm").token_ids == \
        local.generate(p, context=c, max_new_tokens=8, mode="llm").token_ids
    # fp16 on the wire runs too (values may differ in the last bits)
    half = Generator(llm=None, slm=smol, llm_url=server.url, cfg=cfg)
    assert half.generate(p, context=c, max_new_tokens=4).token_ids


def test_protocol_refusals_keep_the_connection(server):
    from websockets.sync.client import connect

    with connect(server.url, compression=None, open_timeout=30) as ws:
        def ask(frame):
            ws.send(frame)
            return P.decode(ws.recv(timeout=60))

        assert ask("hello as text")[0]["op"] == "error"
        assert ask(b"\x00")[0]["op"] == "error"
        assert ask(b"\xff\xff\x00\x00{}")[0]["op"] == "error"
        assert ask(P.encode({"op": "nope"}))[0]["op"] == "error"
        assert ask(P.encode({"op": "step", "sid": 99}, P.pack_int32([1])))[0]["op"] == "error"
        # prompt longer than the server's --max-prompt-tokens 512
        h, _ = ask(P.encode({"op": "open", "sid": 1, "rows": [600]}, P.pack_int32([5] * 600)))
        assert h["op"] == "error" and "512" in h["message"]
        # payload size must match the header
        h, _ = ask(P.encode({"op": "open", "sid": 1, "rows": [3]}, P.pack_int32([5] * 2)))
        assert h["op"] == "error"
        h, _ = ask(P.encode({"op": "open", "sid": 1, "rows": [2]}, P.pack_int32([5, 10**6])))
        assert h["op"] == "error" and "token ids" in h["message"]
        hello, _ = ask(P.encode({"op": "hello"}))
        assert hello["op"] == "hello" and hello["vocab_size"] == 49152
        h, payload = ask(P.encode({"op": "open", "sid": 2, "rows": [2], "format": "topk", "k": 3}, P.pack_int32([1, 2])))
        assert h["op"] == "logits" and len(payload) == 3 * 8


def test_server_limit_is_a_clear_error(server, smol):
    gen = Generator(llm=None, slm=smol, llm_url=server.url)
    with pytest.raises((StreamError, Exception)) as info:
        gen.generate("word " * 700, context="", max_new_tokens=2)
    assert "512" in str(info.value)
