"""`costeer serve` against hostile clients (issue 18): the memory budget (KV caches, unread replies,
connection buffers) refuses with "busy" before any work and is released on close, expiry and
disconnect; the model thread interleaves long prefills and replays with other sessions' steps
(chunked, and a replay still equals the lost session bit for bit); TLS with a certificate made
here; and the small defects: duplicate Authorization headers, IPv6 hosts, odd `sid`s and deeply
nested headers, impossible `vocab_size` announcements."""
import asyncio
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from websockets.sync.client import connect

from costeer import StreamError, WebSocketLLMStream
from costeer.serve import protocol as P
from costeer.serve.server import (
    LLMServer,
    MemoryBudget,
    Scheduler,
    bind_host,
    kv_bytes_per_token,
    main as serve_main,
    parse_bytes,
    url_host,
)
from costeer.kv import KVBatch
from costeer.serve.protocol import score_frame
from tests.costeer.conftest import ROOT
from tests.costeer.tiny import ServerThread

FRAME = 64 * 1024  # --max-frame-bytes of these servers: each connection charges 2 frames
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), TOKENIZERS_PARALLELISM="false")


def _conn(url, **kw):
    return connect(url, compression=None, max_size=None, **kw).__enter__()


def _ask(ws, frame, timeout=60):
    ws.send(frame)
    return P.decode(ws.recv(timeout=timeout))


def _open(sid, rows, fmt="topk", k=4, replay=None, dtype="float16"):
    header = {"op": "open", "sid": sid, "rows": [len(r) for r in rows], "format": fmt, "k": k, "dtype": dtype}
    flat = [x for r in rows for x in r]
    if replay:
        header["replay"] = len(replay)
        flat += [x for step in replay for x in step]
    return P.encode(header, P.pack_int32(flat))


def _wait_used(st, expected, timeout=10):
    """The budget's use once in-flight sends have settled (a reply is released after the socket took it)."""
    deadline = time.time() + timeout
    while True:
        used = st.call(lambda: st.server.budget.used)
        if used == expected or time.time() > deadline:
            return used
        time.sleep(0.01)


# -- memory budget ----------------------------------------------------------------------------


def test_parse_bytes_and_kv_size(tiny):
    assert parse_bytes("4GiB") == 4 * 2**30 and parse_bytes("512MB") == 512 * 10**6 and parse_bytes("1e6") == 10**6
    assert parse_bytes("1.5 kib") == 1536
    for bad in ("", "x", "-1GiB", "4 GiBs", "0"):
        with pytest.raises(ValueError, match="memory size"):
            parse_bytes(bad)
    c = tiny.model.config  # 2 layers x 2 KV heads x head dim 8 x float32, K and V
    assert kv_bytes_per_token(tiny.model) == 2 * c.num_hidden_layers * c.num_key_value_heads * 8 * 4 == 256
    with pytest.raises(ValueError, match="memory budget"):
        MemoryBudget(0)
    with pytest.raises(ValueError, match="prefill_chunk"):
        LLMServer(tiny, prefill_chunk=0)


def test_budget_refuses_before_work_and_is_released(tiny):
    kvb = kv_bytes_per_token(tiny.model)
    conn = 2 * FRAME
    with ServerThread(tiny, memory_budget=8 * 2**20, max_frame_bytes=FRAME, idle_timeout=0.5, tick=0.05) as st:
        ws = _conn(st.url)
        assert _wait_used(st, conn) == conn  # the connection's input buffer
        # 16 rows x 400 positions of KV and a 16-row float32 answer (+ send slack) do not fit in 8 MiB: busy, no work
        h, _ = _ask(ws, _open(1, [[5] * 400] * 16, fmt="full", dtype="float32"))
        assert h["op"] == "error" and h["code"] == "busy" and "memory budget" in h["message"], h
        assert "--memory-budget" in h["message"]
        assert st.call(lambda: (st.server.opened_total, st.server.session_count)) == (0, 0)
        assert _wait_used(st, conn) == conn
        # a small session fits; its KV cache is charged while it lives, and grows with each step
        h, _ = _ask(ws, _open(1, [[1, 2, 3]]))
        assert h["op"] == "logits"
        assert _wait_used(st, conn + 3 * kvb) == conn + 3 * kvb
        assert _ask(ws, P.encode({"op": "step", "sid": 1}, P.pack_int32([4])))[0]["op"] == "logits"
        assert _wait_used(st, conn + 4 * kvb) == conn + 4 * kvb
        assert _ask(ws, P.encode({"op": "close", "sid": 1}))[0]["op"] == "closed"
        assert _wait_used(st, conn) == conn  # released on close
        assert _ask(ws, _open(2, [[1, 2, 3], [4, 5]]))[0]["op"] == "logits"
        assert _wait_used(st, conn + 2 * 3 * kvb) == conn + 2 * 3 * kvb  # rows x padded positions
        ws.close()
        assert _wait_used(st, 0) == 0  # released on disconnect
        # released on idle expiry (the connection stays open and busy stepping another session)
        with connect(st.url, compression=None) as ws2:
            for sid in (1, 2):
                assert _ask(ws2, _open(sid, [[1, 2, 3]]))[0]["op"] == "logits"
            for _ in range(10):
                time.sleep(0.1)
                assert _ask(ws2, P.encode({"op": "step", "sid": 2}, P.pack_int32([4])))[0]["op"] == "logits"
            steps = 10
            assert _wait_used(st, conn + (3 + steps) * kvb) == conn + (3 + steps) * kvb  # session 1 freed
        assert st.call(lambda: st.server.budget.refused) == 1


def test_unread_replies_are_charged(tiny):
    """Answers a client does not read stay charged until the socket took them: two 50 MB score answers
    do not fit in 128 MiB at once; after the first client leaves, the second one's fits."""
    rows, n = 8, 32
    with ServerThread(tiny, memory_budget=128 * 2**20, max_frame_bytes=FRAME, send_timeout=60) as st:
        a = _conn(st.url, max_queue=1)  # reads nothing: its first answer fills its queue
        a.send(_open(1, [[1, 2, 3]] * rows, fmt="full", dtype="float32"))
        a.send(P.encode(*score_frame(1, [[7] * n] * rows)))
        deadline = time.time() + 60
        while time.time() < deadline and st.call(lambda: st.server.budget.used) < rows * n * tiny.vocab_size * 4:
            time.sleep(0.05)
        pending = st.call(lambda: st.server.budget.used)
        assert pending >= rows * n * tiny.vocab_size * 4  # the unread 50 MB answer
        b = _conn(st.url)
        assert _ask(b, _open(1, [[1, 2, 3]] * rows, fmt="full", dtype="float32"))[0]["op"] == "logits"
        h, _ = _ask(b, P.encode(*score_frame(1, [[7] * n] * rows)))
        assert h["op"] == "error" and h["code"] == "busy" and "memory budget" in h["message"], h
        a.close()
        b_only = 2 * FRAME + rows * 3 * kv_bytes_per_token(tiny.model)
        assert _wait_used(st, b_only, timeout=60) == b_only  # a's unread answer went with its connection
        h, payload = _ask(b, P.encode(*score_frame(1, [[7] * n] * rows)))
        assert h["op"] == "logits" and h["rows"] == rows * n and len(payload) == rows * n * tiny.vocab_size * 4
        b.close()
        assert _wait_used(st, 0) == 0


def test_connections_are_charged(tiny):
    with ServerThread(tiny, memory_budget=5 * FRAME, max_frame_bytes=FRAME) as st:
        held = [_conn(st.url), _conn(st.url)]
        with pytest.raises(StreamError, match="busy.*input buffer"):
            WebSocketLLMStream(st.url, reconnect_timeout=0)
        held.pop().close()
        assert _wait_used(st, 2 * FRAME) == 2 * FRAME
        s = WebSocketLLMStream(st.url, response_format="topk")
        s.close()
        held[0].close()


# -- fair scheduling ----------------------------------------------------------------------------


def test_scheduler_runs_new_requests_between_forwards_of_a_long_job():
    log = []
    gate = threading.Event()

    def long_job():
        for i in range(20):
            log.append(f"A{i}")
            if i == 3:
                gate.wait(10)  # the short job is queued while A is in forward 3
            yield
        return "A"

    def short_job():
        yield from ()
        log.append("B")
        return "B"

    async def main():
        sched = Scheduler()
        try:
            fa = sched.submit(long_job())
            while "A3" not in log:
                await asyncio.sleep(0.001)
            fb = sched.submit(short_job())
            gate.set()
            (b, _), (a, dt) = await fb, await fa
            assert (a, b) == ("A", "B") and dt >= 0
        finally:
            sched.shutdown()

    asyncio.run(main())
    assert log.index("B") == log.index("A3") + 1, log  # right after the forward that was running


def test_scheduler_cancelled_job_stops_and_errors_reach_the_caller():
    ran = []

    def job():
        for i in range(1000):
            ran.append(i)
            time.sleep(0.001)
            yield

    def failing():
        yield
        raise ValueError("boom")

    async def main():
        sched = Scheduler()
        try:
            f = sched.submit(job())
            await asyncio.sleep(0.05)
            f.cancel()
            with pytest.raises(ValueError, match="boom"):
                await sched.submit(failing())
            n = len(ran)
            await asyncio.sleep(0.05)
            assert len(ran) == n < 1000
        finally:
            sched.shutdown()

    asyncio.run(main())


def test_scheduler_survives_a_closed_event_loop():
    """A job whose event loop closed while it computed (its server stopped) is dropped; the model
    thread serves the next loop's jobs (before: the thread died with "Event loop is closed")."""
    gate = threading.Event()

    def slow():
        gate.wait(10)
        yield
        return "late"

    sched = Scheduler()
    try:
        async def leave():
            sched.submit(slow())

        asyncio.run(leave())  # the loop closes with the job still queued or running
        gate.set()

        async def after():
            return await asyncio.wait_for(sched.submit(iter(())), 10)

        deadline = time.time() + 10
        while sched._thread.is_alive() and (sched._new or sched._running) and time.time() < deadline:
            time.sleep(0.01)
        assert asyncio.run(after())[0] is None
        assert sched._thread.is_alive()
    finally:
        sched.shutdown()


def test_victim_steps_are_served_while_a_long_open_computes(tiny):
    """A hostile 16-row open with a 400-step replay is cut into forwards: the victim's five steps are
    answered while it still computes (before: they waited for all of it)."""
    with ServerThread(tiny, prefill_chunk=64) as st:
        victim = _conn(st.url)
        assert _ask(victim, _open(1, [[1, 2, 3]]))[0]["op"] == "logits"
        hostile = _conn(st.url)
        hostile.send(_open(1, [[9] * 100] * 16, replay=[[5] * 16] * 400))

        def hostile_busy():
            return any(s[sid].get("busy") and s[sid]["rows"] == 16 for s, sid in st.server.registry.values())

        deadline = time.time() + 30
        while not st.call(hostile_busy) and time.time() < deadline:
            time.sleep(0.001)
        assert st.call(hostile_busy)
        for _ in range(5):
            assert _ask(victim, P.encode({"op": "step", "sid": 1}, P.pack_int32([4])))[0]["op"] == "logits"
        assert st.call(hostile_busy), "the victim waited for the whole hostile open"
        h, _ = P.decode(hostile.recv(timeout=120))
        assert h["op"] == "logits" and h["step"] == 400
        victim.close()
        hostile.close()


def test_a_step_is_served_in_one_turn_of_the_model_thread(tiny):
    """A victim's step (forward + its small answer) runs between two forwards of a long job, with
    none of them in between (before: the answer was encoded one turn later, after another forward)."""
    server = LLMServer(tiny, memory_budget=2**30)
    log = []
    encode = server._logits_frame

    def logged_encode(*args, **kw):
        frame = yield from encode(*args, **kw)
        log.append("answer")
        return frame

    server._logits_frame = logged_encode

    def long_job():
        for i in range(400):
            log.append(i)
            time.sleep(0.01)
            yield

    async def main():
        sessions = {}
        reply, charge = await server.handle_charged(_open(1, [[1, 2, 3]]), sessions, FRAME)
        server.budget.release(charge)
        kv = sessions[1]["kv"]
        step = kv.step

        def logged_step(tokens):
            log.append("forward")
            return step(tokens)

        kv.step = logged_step
        long = server.pool.submit(long_job())
        while len(log) < 3:
            await asyncio.sleep(0.001)
        for _ in range(5):
            reply, charge = await server.handle_charged(P.encode({"op": "step", "sid": 1}, P.pack_int32([4])),
                                                        sessions, FRAME)
            server.budget.release(charge)
            assert P.decode(reply)[0]["op"] == "logits"
            await asyncio.sleep(0.003)
        long.cancel()

    try:
        asyncio.run(main())
    finally:
        server.pool.shutdown()
    turns = [log[i + 1] for i, x in enumerate(log) if x == "forward"]
    assert turns == ["answer"] * 5, f"another job's forward ran between a step and its answer: {log}"


def test_a_closed_connection_stops_its_work(tiny):
    """A client that disconnects during a long replay stops it at the next forward: the session,
    its budget and the model thread are freed (before: the replay ran to its end first)."""
    with ServerThread(tiny, prefill_chunk=16) as st:
        hostile = _conn(st.url)
        hostile.send(_open(1, [[9] * 100] * 16, replay=[[5] * 16] * 400))

        def busy_kv():
            for s, sid in st.server.registry.values():
                if s[sid].get("busy") and s[sid]["kv"] is not None and s[sid]["kv"].cached > 100:
                    return s[sid]["kv"]

        deadline = time.time() + 60
        kv = None
        while kv is None and time.time() < deadline:
            kv = st.call(busy_kv)
            time.sleep(0.002)
        assert kv is not None, "the replay never started"
        hostile.close()
        deadline = time.time() + 60
        while (st.call(lambda: len(st.server.registry)) or st.call(lambda: st.server.budget.used)) \
                and time.time() < deadline:
            time.sleep(0.005)
        assert st.call(lambda: len(st.server.registry)) == 0 and st.call(lambda: st.server.budget.used) == 0
        time.sleep(0.2)
        done = int(kv.lengths.max()) - 100
        assert done < 400, "the replay ran to its end after its client had gone"
        assert st.call(lambda: not st.server.pool._running and not st.server.pool._new)


def test_chunked_prefill_matches_one_forward_and_replays_bit_exactly(tiny):
    rows = [list(range(10, 310)), list(range(500, 550))]  # 300 and 50 tokens: left padding across chunks
    ref = KVBatch(tiny.model, rows, tiny.pad_token_id, max_len=tiny.max_len)
    ref_logits = [ref.prefill().logits]
    steps = [[11, 12], [13, 14], [15, 16]]
    for t in steps:
        ref_logits.append(ref.step(t).logits)
    with ServerThread(tiny, prefill_chunk=64) as st:  # 32 positions a forward for 2 rows: 10 forwards
        s = WebSocketLLMStream(st.url, dtype="float32")
        s.open(rows)
        got = [s.recv().logits]
        for t in steps:
            s.send(t)
            got.append(s.recv().logits)
        s.finish()
        for g, r in zip(got, ref_logits):
            torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)  # same math, other summation order
        with connect(st.url, compression=None, max_size=None) as ws:
            h, payload = _ask(ws, _open(1, rows, fmt="full", dtype="float32", replay=steps))
            assert h["op"] == "logits" and h["step"] == 3
            replayed = P.unpack_full(payload, 2, tiny.vocab_size, "float32")
        assert torch.equal(replayed, got[-1])  # the resumed session computes exactly what the lost one did
        s.close()


# -- TLS ----------------------------------------------------------------------------------------


def _self_signed(folder):
    """(certificate PEM path, key PEM path) for localhost / 127.0.0.1, made here."""
    cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    try:
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        if subprocess.run(["openssl", "version"], capture_output=True).returncode != 0:
            pytest.skip("neither the cryptography package nor the openssl command is available")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
        return cert, key
    k = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    c = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(k.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                     x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
         .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
         .sign(k, hashes.SHA256()))
    with open(cert, "wb") as f:
        f.write(c.public_bytes(serialization.Encoding.PEM))
    with open(key, "wb") as f:
        f.write(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()))
    return cert, key


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    return _self_signed(str(tmp_path_factory.mktemp("tls")))


def test_tls_serves_wss_and_the_client_verifies(tiny, cert, monkeypatch):
    import ssl

    monkeypatch.delenv("COSTEER_CA_FILE", raising=False)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*cert)
    with ServerThread(tiny, ssl_context=ctx) as st:
        assert st.url.startswith("wss://127.0.0.1:")
        s = WebSocketLLMStream(st.url, ca_file=cert[0], dtype="float32")
        s.open([[1, 2, 3]])
        assert s.recv().logits.shape == (1, tiny.vocab_size)
        s.close()
        monkeypatch.setenv("COSTEER_CA_FILE", cert[0])  # the same through the environment
        WebSocketLLMStream(st.url.replace("127.0.0.1", "localhost")).close()
        monkeypatch.delenv("COSTEER_CA_FILE")
        t0 = time.time()
        with pytest.raises(StreamError, match="not trusted.*--ca-file"):  # a refusal: never retried
            WebSocketLLMStream(st.url)
        assert time.time() - t0 < 10
        with pytest.raises(ValueError, match="ca_file"):
            WebSocketLLMStream(st.url, ca_file=os.path.join(os.path.dirname(cert[0]), "missing.pem"))
        with pytest.raises(StreamError):  # plain ws:// to a TLS server gets no costeer hello
            WebSocketLLMStream(st.url.replace("wss://", "ws://"), reconnect_timeout=0, timeout=5)


def test_serve_tls_flags(cert, capsys):
    with pytest.raises(SystemExit) as info:
        serve_main(["--ssl-keyfile", cert[1]])
    assert info.value.code == 2 and "--ssl-keyfile needs --ssl-certfile" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        serve_main(["--ssl-certfile", cert[1], "--ssl-keyfile", cert[1]])  # a key is not a certificate
    assert "cannot load the certificate" in capsys.readouterr().err


def _serve_proc(args):
    proc = subprocess.Popen([sys.executable, "-m", "costeer", "serve", "--port", "0", "--threads", "1"] + args,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ENV, cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stdout.readline()
        if "listening on " in line:
            return proc, line.split("listening on ")[1].split()[0]
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError("costeer serve did not start")


def test_cli_generates_over_wss(tiny_dir, cert, tmp_path, capsys, monkeypatch):
    from costeer.cli import main as cli_main

    monkeypatch.delenv("COSTEER_CA_FILE", raising=False)
    proc, url = _serve_proc(["--model", tiny_dir, "--host", "127.0.0.1", "--ssl-certfile", cert[0],
                             "--ssl-keyfile", cert[1]])
    try:
        assert url.startswith("wss://127.0.0.1:")
        args = ["generate", "--llm-url", url, "--slm", tiny_dir, "--prompt", "Hi", "--context", "x",
                "--max-new-tokens", "3", "--quiet", "--reconnect-timeout", "0"]
        assert cli_main(args) == 2 and "--ca-file" in capsys.readouterr().err
        assert cli_main(args + ["--ca-file", cert[0]]) == 0
    finally:
        proc.kill()
        proc.wait(30)
        os.environ.pop("COSTEER_CA_FILE", None)


# -- small defects ------------------------------------------------------------------------------


def test_close_with_odd_sid_and_deep_header_are_bad_requests(tiny):
    deep = b"{\"op\":\"open\",\"x\":" + b"[" * 30000 + b"]" * 30000 + b"}"
    with ServerThread(tiny) as st, connect(st.url, compression=None) as ws:
        for frame in (P.encode({"op": "close", "sid": [1]}), P.encode({"op": "close", "sid": {"a": 1}}),
                      P.encode({"op": "close"}), len(deep).to_bytes(4, "little") + deep):
            h, _ = _ask(ws, frame)
            assert h["op"] == "error" and h["code"] == "bad_request", h
        assert _ask(ws, P.encode({"op": "hello"}))[0]["op"] == "hello"


def test_duplicate_authorization_headers_are_401_without_a_traceback(tiny, caplog):
    token = "t0ken-" + "y" * 20
    with ServerThread(tiny, token=token) as st, caplog.at_level(logging.ERROR):
        port = int(st.url.rsplit(":", 1)[1])
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall((f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                       f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                       f"Authorization: Bearer {token}\r\nAuthorization: Bearer {token}\r\n\r\n").encode())
            status = s.recv(4096).split(b"\r\n", 1)[0]
            s.close()
            assert status == b"HTTP/1.1 401 Unauthorized", status
        s = WebSocketLLMStream(st.url, token=token)  # one header: accepted
        s.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


def test_ipv6_hosts(tiny_dir, capsys):
    assert url_host("::1") == "[::1]" and url_host("[::1]") == "[::1]" and url_host("127.0.0.1") == "127.0.0.1"
    assert bind_host("[::1]") == "::1" and bind_host(" :: ") == "::" and bind_host("localhost") == "localhost"
    # an address this machine does not have is refused before the model loads
    assert serve_main(["--host", "192.0.2.1", "--port", "0", "--token", "x" * 16]) == 2
    err = capsys.readouterr().err
    assert "cannot listen on 192.0.2.1" in err and "loading" not in err
    try:
        socket.socket(socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 on this machine")
    proc, url = _serve_proc(["--model", tiny_dir, "--host", "[::1]"])  # brackets accepted
    try:
        assert url.startswith("ws://[::1]:")
        WebSocketLLMStream(url).close()  # the printed URL works as it is
    finally:
        proc.kill()
        proc.wait(30)
    token = "z" * 24
    proc, url = _serve_proc(["--model", tiny_dir, "--host", "::", "--token", token])
    try:
        port = url.rsplit(":", 1)[1]
        assert url.startswith("ws://[") and "]:" in url
        for host in ("127.0.0.1", "[::1]"):  # both stacks
            WebSocketLLMStream(f"ws://{host}:{port}", token=token).close()
    finally:
        proc.kill()
        proc.wait(30)


def test_client_refuses_an_impossible_vocab_size():
    from websockets.asyncio.server import serve

    answers = [{"op": "hello", "protocol": P.PROTOCOL_VERSION, "model": "m", "vocab_size": 2**40, "max_len": 64},
               {"op": "hello", "protocol": P.PROTOCOL_VERSION, "model": "m", "vocab_size": "9", "max_len": 64},
               {"op": "hello", "protocol": P.PROTOCOL_VERSION, "model": "m", "vocab_size": 100, "max_len": 64,
                "eos_token_ids": [10**12]}]
    ready, stop = threading.Event(), None
    where = {}

    async def handler(ws):
        await ws.recv()
        await ws.send(P.encode(answers[where["i"]]))
        await ws.wait_closed()

    async def main():
        nonlocal stop
        stop = asyncio.Event()
        where["loop"] = asyncio.get_running_loop()
        async with serve(handler, "127.0.0.1", 0) as srv:
            where["port"] = next(iter(srv.sockets)).getsockname()[1]
            ready.set()
            await stop.wait()

    t = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    t.start()
    ready.wait(10)
    try:
        for i in range(len(answers)):
            where["i"] = i
            with pytest.raises(StreamError, match="impossible model"):
                WebSocketLLMStream(f"ws://127.0.0.1:{where['port']}", reconnect_timeout=0)
    finally:
        where["loop"].call_soon_threadsafe(stop.set)
        t.join(10)


def test_bad_numbers_are_refused(capsys, tmp_path):
    from costeer.cli import main as cli_main

    with pytest.raises(SystemExit) as info:
        serve_main(["--threads", "-1"])
    assert info.value.code == 2 and "--threads must be >= 1" in capsys.readouterr().err
    for bad in ("--memory-budget=lots", "--memory-budget=0", "--prefill-chunk=0"):
        with pytest.raises(SystemExit):
            serve_main([bad])
        assert "error" in capsys.readouterr().err
    assert cli_main(["generate", "--prompt", "x", "--threads", "-1"]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err
    assert cli_main(["generate", "--prompt", "x", "--timeout", "-1", "--llm-url", "ws://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "--timeout must be > 0" in err and "reach" not in err


def test_large_score_is_chunked_and_equals_one_forward(tiny):
    """A score of more than --prefill-chunk tokens runs as several forwards (between other sessions'
    steps) and answers what one forward answers, up to summation order; the step count stays right."""
    rows = [[1, 2, 3, 4], [5, 6, 7, 8]]
    drafts = [[9, 10, 11, 12, 13, 14], [15, 16, 17, 18, 19, 20]]
    answers = []
    for chunk in (64, 4):  # 4 tokens a forward for 2 rows: 3 forwards of 2 positions
        with ServerThread(tiny, prefill_chunk=chunk) as st, connect(st.url, compression=None, max_size=None) as ws:
            assert _ask(ws, _open(1, rows, fmt="full", dtype="float32"))[0]["op"] == "logits"
            h, payload = _ask(ws, P.encode(*score_frame(1, drafts)))
            assert h["op"] == "logits" and h["rows"] == 12 and h["step"] == 1
            answers.append(P.unpack_full(payload, 12, tiny.vocab_size, "float32"))
            h, _ = _ask(ws, P.encode(*score_frame(1, [[1], [2]], rollback=3)))
            assert h["op"] == "logits" and h["step"] == 2
    torch.testing.assert_close(answers[1], answers[0], atol=1e-4, rtol=1e-4)
