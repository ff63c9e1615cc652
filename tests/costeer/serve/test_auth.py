"""Security of `costeer serve`: a token whenever it binds a non-loopback address, the token checked
in the handshake, limits, and nothing received is unpickled or evaluated (session isolation and
malformed frames: tests/costeer/serve/test_server_load.py)."""
import ast
import os

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from costeer import StreamError, WebSocketLLMStream
from costeer.serve import protocol as P
from costeer.cli import main as cli_main
from costeer.serve.server import is_loopback, main as serve_main, serve_forever
from tests.costeer.conftest import ROOT
from tests.costeer.tiny import ServerThread

TOKEN = "s3cret-" + "x" * 24


def test_loopback_detection():
    for h in ("127.0.0.1", "127.5.6.7", "::1", "[::1]", "localhost"):
        assert is_loopback(h), h
    for h in ("0.0.0.0", "", "::", "192.168.1.5", "10.0.0.1", "example.com", "127.0.0.1.nip.io"):
        assert not is_loopback(h), h


def test_non_loopback_bind_requires_a_token(monkeypatch, capsys, tiny):
    import asyncio

    monkeypatch.delenv("COSTEER_TOKEN", raising=False)
    assert serve_main(["--host", "0.0.0.0", "--port", "0"]) == 2  # refused before loading any model
    err = capsys.readouterr().err
    assert "0.0.0.0 is not a loopback address" in err and "--token" in err and "COSTEER_TOKEN" in err
    with pytest.raises(ValueError, match="token is required"):
        asyncio.run(serve_forever(None, "0.0.0.0", 0))
    # with a token, any address is allowed (and every client must present it)
    with ServerThread(tiny, host="0.0.0.0", token=TOKEN) as st:
        url = st.url.replace("0.0.0.0", "127.0.0.1")
        with pytest.raises(StreamError, match="requires a token"):
            WebSocketLLMStream(url)
        s = WebSocketLLMStream(url, token=TOKEN)
        s.open([[1, 2, 3]])
        assert s.recv().logits.shape == (1, tiny.vocab_size)
        s.close()


def test_token_is_checked_in_the_handshake(monkeypatch, tiny, tiny_dir, capsys):
    monkeypatch.delenv("COSTEER_TOKEN", raising=False)
    with ServerThread(tiny, token=TOKEN) as st:
        for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                        {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": f"Basic {TOKEN}"}):
            with pytest.raises(InvalidStatus) as info:
                with connect(st.url, additional_headers=headers, open_timeout=10):
                    pass
            assert info.value.response.status_code == 401
            assert b"Bearer" in info.value.response.body
        with pytest.raises(StreamError, match="requires a token"):
            WebSocketLLMStream(st.url)
        with pytest.raises(StreamError, match="refused the token"):
            WebSocketLLMStream(st.url, token="wrong")
        with connect(st.url, additional_headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
            ws.send(P.encode({"op": "hello"}))
            assert P.decode(ws.recv(timeout=10))[0]["op"] == "hello"
        monkeypatch.setenv("COSTEER_TOKEN", TOKEN)  # the client reads the same variable
        s = WebSocketLLMStream(st.url)
        s.open([[1, 2, 3]])
        assert s.recv().logits.shape == (1, tiny.vocab_size)
        s.close()
        monkeypatch.delenv("COSTEER_TOKEN")
        args = ["generate", "--llm-url", st.url, "--slm", tiny_dir, "--prompt", "Hi", "--max-new-tokens", "2",
                "--quiet"]
        assert cli_main(args) == 2
        assert "requires a token" in capsys.readouterr().err
        assert cli_main(args + ["--token", TOKEN]) == 0
        # reconnecting after a fault never retries a refusal
        s = WebSocketLLMStream(st.url, token=TOKEN, reconnect_timeout=5)
        s.token = "wrong"
        s.open([[1, 2, 3]])
        s._ws.close()  # the connection drops; the retry is refused with 401: a clear error at once
        with pytest.raises(StreamError, match="refused the token"):
            s.recv()


def test_limits_are_clear_errors(tiny):
    with ServerThread(tiny, max_prompt_tokens=8, max_rows=2, max_k=16, max_frame_bytes=4096) as st, \
            connect(st.url, compression=None) as ws:
        def ask(frame):
            ws.send(frame)
            return P.decode(ws.recv(timeout=10))[0]

        limits = ask(P.encode({"op": "hello"}))["limits"]
        assert limits["max_prompt_tokens"] == 8 and limits["max_frame_bytes"] == 4096
        h = ask(P.encode({"op": "open", "sid": 1, "rows": [9]}, P.pack_int32([1] * 9)))
        assert h["op"] == "error" and "outside [1, 8] (server limit)" in h["message"]
        h = ask(P.encode({"op": "open", "sid": 1, "rows": [1, 1, 1]}, P.pack_int32([1] * 3)))
        assert h["op"] == "error" and "at most 2 rows" in h["message"]
        h = ask(P.encode({"op": "open", "sid": 1, "rows": [1], "format": "topk", "k": 17}, P.pack_int32([1])))
        assert h["op"] == "error" and "[1, 16]" in h["message"]
        assert ask(P.encode({"op": "open", "sid": 1, "rows": [8], "format": "topk"}, P.pack_int32([1] * 8)))["op"] == "logits"
        ws.send(b"\x00" * 5000)  # over --max-frame-bytes: the connection is closed with 1009
        with pytest.raises(Exception):
            ws.recv(timeout=10)
        assert ws.close_code == 1009
    with ServerThread(tiny, max_prompt_tokens=8) as st:
        s = WebSocketLLMStream(st.url)
        s.open([[1] * 9])
        with pytest.raises(StreamError, match="outside \\[1, 8\\]"):
            s.recv()
        s.close()


FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__", "loads"}  # loads: only json.loads is allowed
FORBIDDEN_MODULES = {"pickle", "cPickle", "marshal", "shelve", "dill", "cloudpickle", "joblib"}


@pytest.mark.parametrize("path", ["costeer/serve/server.py", "costeer/serve/protocol.py", "costeer/llm/base.py", "costeer/llm/serve_client.py", "costeer/llm/openai.py", "costeer/serve/score.py"])
def test_nothing_received_is_unpickled_or_evaluated(path):
    tree = ast.parse(open(os.path.join(ROOT, path), encoding="utf-8").read())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            assert not FORBIDDEN_MODULES & {n.split(".")[0] for n in names}, (path, names)
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            if name in FORBIDDEN_CALLS:
                assert name == "loads" and isinstance(f, ast.Attribute) and getattr(f.value, "id", None) == "json", \
                    (path, ast.dump(node)[:120])
            if name in ("load", "frombuffer"):
                # torch.load / numpy.load would unpickle; frombuffer only with an explicit numeric dtype
                assert name == "frombuffer" and any(k.arg == "dtype" for k in node.keywords), (path, ast.dump(node)[:120])
