"""`costeer serve` under load on loopback (a tiny random model, so that a forward costs ~1 ms):
concurrent sessions answer exactly what they answer alone, sessions are isolated, idle and slow
clients are cut off and their KV caches freed, the session limit answers "busy", malformed frames
get an error and the server keeps serving, memory stays bounded over many sessions."""
import gc
import os
import pickle
import random
import threading
import time
import weakref

import pytest
from websockets.sync.client import connect

from costeer import StreamError, WebSocketLLMStream
from costeer.serve import protocol as P
from costeer.loop import chat_ids
from costeer.kv import KVBatch
from tests.costeer.tiny import ServerThread

N_CONCURRENT = 32
STEPS = 8


def _greedy(stream, prompt, steps=STEPS):
    """Greedy decoding on the served logits: (tokens, the last logits as raw float32 bytes)."""
    stream.open([prompt])
    out = stream.recv()
    toks = []
    for _ in range(steps):
        t = int(out.logits[0].argmax())
        toks.append(t)
        stream.send([t])
        out = stream.recv()
    stream.finish()
    return toks, out.logits.numpy().tobytes()


def _prompts(tok, n):
    topics = ["cats", "rivers", "tax law", "jazz", "volcanoes", "chess", "bread", "Mars"]
    return [chat_ids(tok, f"Request {i}: tell me about {topics[i % len(topics)]} in {i + 2} words.") for i in range(n)]


def _conn(url, **kw):
    return connect(url, compression=None, **kw).__enter__()  # closed by the test


def _ask(ws, frame, timeout=30):
    ws.send(frame)
    return P.decode(ws.recv(timeout=timeout))


def test_concurrent_sessions_equal_solo_runs(tiny):
    prompts = _prompts(tiny.tokenizer, N_CONCURRENT)
    with ServerThread(tiny, max_total_sessions=64) as st:
        solo_stream = WebSocketLLMStream(st.url, dtype="float32")
        solo = [_greedy(solo_stream, p) for p in prompts]
        solo_stream.close()

        held = []
        barrier = threading.Barrier(N_CONCURRENT + 1, timeout=60)
        results, errors = [None] * N_CONCURRENT, []

        def client(i):
            try:
                s = WebSocketLLMStream(st.url, dtype="float32")
                s.open([prompts[i]])
                out = s.recv()
                barrier.wait()  # every session is open at once here
                barrier.wait()
                toks = []
                for _ in range(STEPS):
                    t = int(out.logits[0].argmax())
                    toks.append(t)
                    s.send([t])
                    out = s.recv()
                s.finish()
                s.close()
                results[i] = (toks, out.logits.numpy().tobytes())
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(f"client {i}: {exc!r}")
                barrier.abort()

        threads = [threading.Thread(target=client, args=(i,)) for i in range(N_CONCURRENT)]
        for t in threads:
            t.start()
        barrier.wait()
        held.append(st.call(lambda: st.server.session_count))
        barrier.wait()
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert held == [N_CONCURRENT]  # all sessions held at once, each with its own KV cache
        for i in range(N_CONCURRENT):
            assert results[i] == solo[i], f"session {i} differs from its solo run"
        assert len({r[0][0] for r in results}) > 1  # the prompts really differ
        assert st.call(lambda: st.server.session_count) == 0  # every KV cache was freed


def test_sessions_are_isolated(tiny):
    prompt = _prompts(tiny.tokenizer, 1)[0]
    with ServerThread(tiny) as st, connect(st.url, compression=None) as a, connect(st.url, compression=None) as b:
        h, _ = _ask(a, P.encode({"op": "open", "sid": 1, "rows": [len(prompt)], "format": "topk", "k": 2},
                                P.pack_int32(prompt)))
        assert h["op"] == "logits" and len(h["session"]) == 32  # a 128-bit random id, for logs only
        gid = h["session"]
        # the other connection can neither continue, read nor close it, by handle or by id
        h2, _ = _ask(b, P.encode({"op": "step", "sid": 1}, P.pack_int32([5])))
        assert h2["op"] == "error" and "no open session 1 on this connection" in h2["message"]
        h2, _ = _ask(b, P.encode({"op": "step", "sid": gid}, P.pack_int32([5])))
        assert h2["op"] == "error" and "'sid' must be an integer" in h2["message"]
        assert _ask(b, P.encode({"op": "close", "sid": 1}))[0]["op"] == "closed"  # a no-op for b
        h, _ = _ask(a, P.encode({"op": "step", "sid": 1}, P.pack_int32([5])))
        assert h["op"] == "logits" and h["step"] == 1  # a's session is untouched
        # the same sid on two connections: two independent sessions
        h2, _ = _ask(b, P.encode({"op": "open", "sid": 1, "rows": [2], "format": "topk", "k": 2}, P.pack_int32([7, 8])))
        assert h2["op"] == "logits" and h2["session"] != gid
        assert st.call(lambda: st.server.session_count) == 2


def test_idle_sessions_and_connections_are_freed(tiny):
    prompt = _prompts(tiny.tokenizer, 1)[0]
    with ServerThread(tiny, idle_timeout=0.4, tick=0.05) as st:
        # a silent client: its connection is closed and its session's KV cache freed
        ws = _conn(st.url)
        assert _ask(ws, P.encode({"op": "open", "sid": 1, "rows": [len(prompt)], "format": "topk"},
                                 P.pack_int32(prompt)))[0]["op"] == "logits"
        def first_kv():
            sessions, sid = next(iter(st.server.registry.values()))
            return weakref.ref(sessions[sid]["kv"])

        kv = st.call(first_kv)
        assert kv() is not None
        time.sleep(0.8)
        gc.collect()
        assert st.call(lambda: st.server.session_count) == 0 and kv() is None
        with pytest.raises(Exception):
            ws.recv(timeout=5)  # closed by the server: "idle timeout"
        assert ws.close_code == 1001
        ws.close()

        # an active connection with one idle session: that session expires, the other lives on
        with connect(st.url, compression=None) as ws:
            for sid in (1, 2):
                assert _ask(ws, P.encode({"op": "open", "sid": sid, "rows": [3], "format": "topk"},
                                         P.pack_int32([1, 2, 3])))[0]["op"] == "logits"
            for _ in range(8):
                time.sleep(0.1)
                assert _ask(ws, P.encode({"op": "step", "sid": 2}, P.pack_int32([4])))[0]["op"] == "logits"
            h, _ = _ask(ws, P.encode({"op": "step", "sid": 1}, P.pack_int32([4])))
            assert h["op"] == "error" and h["code"] == "expired" and "idle" in h["message"]
            assert st.call(lambda: st.server.session_count) == 1

        # the client stream resumes transparently after being cut off for idling
        s = WebSocketLLMStream(st.url, dtype="float32")
        ref = _greedy(s, prompt, steps=6)
        s.open([prompt])
        out = s.recv()
        toks = []
        for i in range(6):
            if i == 3:
                time.sleep(0.8)  # idle: the server closes the connection and frees the session
            t = int(out.logits[0].argmax())
            toks.append(t)
            s.send([t])
            out = s.recv()
        assert (toks, out.logits.numpy().tobytes()) == ref and s.reconnects == 1
        s.close()


def test_slow_reader_is_disconnected(tiny):
    prompt = _prompts(tiny.tokenizer, 1)[0]
    with ServerThread(tiny, send_timeout=0.5, tick=0.05) as st:
        # never reads: the answers (196 KB each) fill the socket buffers, then the server gives up
        ws = _conn(st.url, max_queue=1, close_timeout=0.5)
        ws.send(P.encode({"op": "open", "sid": 1, "rows": [len(prompt)], "format": "full", "dtype": "float32"},
                         P.pack_int32(prompt)))
        for _ in range(150):
            ws.send(P.encode({"op": "step", "sid": 1}, P.pack_int32([5])))
        deadline = time.time() + 30
        while time.time() < deadline and st.call(lambda: st.server.opened_total) == 0:
            time.sleep(0.02)
        assert st.call(lambda: st.server.opened_total) == 1
        while time.time() < deadline and st.call(lambda: st.server.session_count):
            time.sleep(0.1)
        assert st.call(lambda: st.server.session_count) == 0  # cut off: its KV cache is freed
        ws.close()
        # and the server keeps serving others
        s = WebSocketLLMStream(st.url)
        assert len(_greedy(s, prompt, steps=2)[0]) == 2
        s.close()


def test_session_limit_answers_busy(tiny):
    with ServerThread(tiny, max_total_sessions=4, max_sessions=3, max_connections=3) as st:
        a, b = _conn(st.url), _conn(st.url)
        for ws, sid in ((a, 1), (a, 2), (a, 3), (b, 1)):
            assert _ask(ws, P.encode({"op": "open", "sid": sid, "rows": [2], "format": "topk"},
                                     P.pack_int32([1, 2])))[0]["op"] == "logits"
        h, _ = _ask(a, P.encode({"op": "open", "sid": 4, "rows": [2]}, P.pack_int32([1, 2])))
        assert h["op"] == "error" and "at most 3 sessions per connection" in h["message"]
        h, _ = _ask(b, P.encode({"op": "open", "sid": 2, "rows": [2]}, P.pack_int32([1, 2])))
        assert h["op"] == "error" and h["code"] == "busy" and "busy" in h["message"] and "4 sessions" in h["message"]
        s = WebSocketLLMStream(st.url)  # the third connection
        s.open([[1, 2, 3]])
        with pytest.raises(StreamError, match="busy"):
            s.recv()
        # a fourth connection is refused as busy too
        with pytest.raises(StreamError, match="busy.*3 connections"):
            WebSocketLLMStream(st.url, reconnect_timeout=0)
        assert _ask(a, P.encode({"op": "close", "sid": 1}))[0]["op"] == "closed"
        s.open([[1, 2, 3]])
        assert s.recv().logits.shape == (1, tiny.vocab_size)  # room again
        s.close()
        a.close()
        b.close()


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/costeer-pwned",))


MALFORMED = [
    "hello as text", b"", b"\x00", b"\xff\xff\xff\xff", b"\x05\x00\x00\x00{}", b"\x02\x00\x00\x00{}",
    b"\x04\x00\x00\x00\xff\xfe\xfd\xfc", P.encode({"op": 5}), b"\x02\x00\x00\x00[]",
    b"\x0b\x00\x00\x00{\"op\":NaN}", pickle.dumps(_Evil()), b"\x10\x00\x00\x00" + pickle.dumps(_Evil()),
    P.encode({"op": "__import__('os').system('x')"}), P.encode({"op": "nope"}),
    P.encode({"op": "open"}), P.encode({"op": "open", "sid": True, "rows": [1]}, P.pack_int32([1])),
    P.encode({"op": "open", "sid": "1", "rows": [1]}, P.pack_int32([1])),
    P.encode({"op": "open", "sid": 1, "rows": []}), P.encode({"op": "open", "sid": 1, "rows": [1.5]}),
    P.encode({"op": "open", "sid": 1, "rows": [0]}), P.encode({"op": "open", "sid": 1, "rows": [-3]}),
    P.encode({"op": "open", "sid": 1, "rows": [10**9]}), P.encode({"op": "open", "sid": 1, "rows": [2]}, b"\x01\x02\x03"),
    P.encode({"op": "open", "sid": 1, "rows": [2]}, P.pack_int32([1, 2, 3])),
    P.encode({"op": "open", "sid": 1, "rows": [2]}, P.pack_int32([1, -1])),
    P.encode({"op": "open", "sid": 1, "rows": [2], "format": "pickle"}, P.pack_int32([1, 2])),
    P.encode({"op": "open", "sid": 1, "rows": [2], "dtype": "float64"}, P.pack_int32([1, 2])),
    P.encode({"op": "open", "sid": 1, "rows": [2], "k": 0}, P.pack_int32([1, 2])),
    P.encode({"op": "open", "sid": 1, "rows": [2], "k": 10**6}, P.pack_int32([1, 2])),
    P.encode({"op": "open", "sid": 1, "rows": [2], "replay": -1}, P.pack_int32([1, 2])),
    P.encode({"op": "open", "sid": 1, "rows": [2], "replay": 1}, P.pack_int32([1, 2])),
    P.encode({"op": "open", "sid": 1, "rows": [2], "replay": 600}, P.pack_int32([1, 2] + [3] * 1200)),
    P.encode({"op": "open", "sid": 1, "rows": [1] * 17}, P.pack_int32([1] * 17)),
    P.encode({"op": "step", "sid": 9}, P.pack_int32([1])), P.encode({"op": "step"}, P.pack_int32([1])),
]


def test_malformed_frames_get_errors_and_the_server_keeps_serving(tiny):
    rng = random.Random(0)
    good_open = P.encode({"op": "open", "sid": 1, "rows": [3], "format": "topk", "k": 4}, P.pack_int32([1, 2, 3]))
    fuzz = []
    for _ in range(300):  # random bytes and random corruptions of valid frames
        if rng.random() < 0.5:
            fuzz.append(bytes(rng.randrange(256) for _ in range(rng.randrange(40))))
        else:
            f = bytearray(good_open)
            for _ in range(rng.randrange(1, 6)):
                f[rng.randrange(len(f))] = rng.randrange(256)
            fuzz.append(bytes(f[: rng.randrange(1, len(f) + 1)]))
    with ServerThread(tiny, max_frame_bytes=64 * 1024) as st, connect(st.url, compression=None) as ws:
        for frame in MALFORMED:
            h, _ = _ask(ws, frame)
            assert h["op"] == "error" and h["code"] == "bad_request" and h["message"], frame
        for frame in fuzz:
            h, _ = _ask(ws, frame)
            assert h["op"] in ("error", "logits"), h
            if h["op"] == "error":
                assert h["message"] and h["code"] == "bad_request", h
        assert not os.path.exists("/tmp/costeer-pwned")
        # the same connection still works
        assert _ask(ws, P.encode({"op": "hello"}))[0]["op"] == "hello"
        h, payload = _ask(ws, good_open)
        assert h["op"] == "logits" and len(payload) == 4 * 8
        # a frame over --max-frame-bytes closes that connection only (code 1009), others go on
        with connect(st.url, compression=None) as big:
            big.send(b"\x00" * (65 * 1024))
            with pytest.raises(Exception):
                big.recv(timeout=10)
            assert big.close_code == 1009
        assert _ask(ws, P.encode({"op": "step", "sid": 1}, P.pack_int32([4])))[0]["op"] == "logits"


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def test_memory_bounded_over_many_sessions(tiny):
    """300 sessions (8 at a time): no KV cache outlives its session, RSS stays flat. The 1000-session
    run with the real model and peak RSS is `python bench/server_load.py` (docs/reliability.md)."""
    prompts = _prompts(tiny.tokenizer, 8)

    def kv_alive():
        gc.collect()
        return sum(1 for o in gc.get_objects() if type(o) is KVBatch)

    with ServerThread(tiny) as st:
        def worker(i, n):
            s = WebSocketLLMStream(st.url, response_format="topk", k=5)
            for j in range(n):
                _greedy(s, prompts[(i + j) % len(prompts)], steps=3)
            s.close()

        def run(n_per_worker):
            ts = [threading.Thread(target=worker, args=(i, n_per_worker)) for i in range(8)]
            for t in ts:
                t.start()
            for t in ts:
                t.join(120)

        base_kv = kv_alive()
        run(5)  # warm-up: 40 sessions
        rss0 = _rss_mb()
        run(32)  # 256 more
        rss1 = _rss_mb()
        assert st.call(lambda: st.server.opened_total) == 296
        assert st.call(lambda: st.server.session_count) == 0
        assert kv_alive() == base_kv
        assert rss1 - rss0 < 40, (rss0, rss1)
