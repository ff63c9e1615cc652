"""`costeer serve` under load: sessions held at once, the "busy" limit, and N sessions in a row with
C concurrent clients; the server's resident memory is sampled all along (peak = VmHWM).

    python bench/server_load.py [--model smollm2] [--sessions 1000] [--concurrency 32] [--steps 4]

Every session decodes greedily from one of 8 prompts; its tokens must equal the solo run of that
prompt (computed first, one session at a time), so "mismatches" counts sessions that were not
isolated. The server runs in a subprocess on 127.0.0.1 and shares the CPU cores with the clients.
Prints one JSON object (also written to --json if given).

    python bench/server_load.py --hostile [--model smollm2] [--memory-budget 2GiB] [--prefill-chunk 16]

Hostile clients (issue 18): a victim session's step latency (send to answer, top-k) alone, then
beside clients that keep opening long prompts (--open-tokens), replaying full-size sessions
(--replay-rows x --replay-steps), opening at every limit (max rows x max prompt tokens: refused by
the memory budget) and leaving score answers unread (16 rows x 64 tokens, float32). Reports the
victim's p50/p99 alone, beside ONE client alternating maximum-size opens and replays (the fairness
target: p99 < 3x alone), and beside all of them at once; and the server's peak RSS (VmHWM) against
budget + model size (RSS after loading) + 10%.
"""
import argparse
import json
import os
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from costeer import StreamError, WebSocketLLMStream  # noqa: E402
from costeer import protocol as P  # noqa: E402
from costeer.generator import chat_ids  # noqa: E402
from costeer.models import load_tokenizer  # noqa: E402

TOPICS = ["cats", "rivers", "tax law", "jazz", "volcanoes", "chess", "bread", "Mars"]


def rss_kb(pid, field="VmRSS"):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def greedy(stream, prompt, steps):
    stream.open([prompt])
    out = stream.recv()
    toks = []
    for _ in range(steps):
        t = int(out.logits[0].argmax())
        toks.append(t)
        stream.send([t])
        out = stream.recv()
    toks.append(int(out.logits[0].argmax()))
    stream.finish()
    return toks


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def hostile(args, url, proc, report, samples):
    """The victim's step latency alone and beside hostile clients (see the module docstring)."""
    import random

    from websockets.sync.client import connect

    from costeer.protocol import score_frame

    hello = WebSocketLLMStream(url, response_format="topk", k=5)
    limits = hello.info["limits"]
    hello.close()
    V = hello.vocab_size
    report.update(memory_budget_mb=round(limits["memory_budget_bytes"] / 2**20, 1),
                  kv_bytes_per_token=limits["kv_bytes_per_token"], prefill_chunk=limits["prefill_chunk"])
    tok = load_tokenizer(args.model)
    prompt = chat_ids(tok, "Tell me about rivers in 40 words.")

    def victim(n):
        s = WebSocketLLMStream(url, response_format="topk", k=5, timeout=3600)
        s.open([prompt])
        out = s.recv()
        lat = []
        for i in range(n + 3):
            t0 = time.perf_counter()
            s.send([int(out.logits[0].argmax())])
            out = s.recv()
            if i >= 3:  # the first steps warm up
                lat.append((time.perf_counter() - t0) * 1e3)
        s.finish()
        s.close()
        return lat

    solo = victim(args.victim_steps)
    stop = threading.Event()
    phase = {"name": "fairness"}
    counts = {"long_opens": 0, "replays": 0, "limit_opens_busy": 0, "busy": 0, "unread_scores_sent": 0}
    rng = random.Random(0)

    def ask(ws, header, payload=b""):
        ws.send(P.encode(header, payload))
        return P.decode(ws.recv(timeout=3600))[0]

    def opens_and_replays(done):
        """ONE connection alternating a long open and a full-size replay, until ``done`` is set."""
        R, n = args.replay_rows, args.replay_steps
        with connect(url, compression=None, max_size=None, ping_interval=None) as ws:
            while not done.is_set():
                ids = [rng.randrange(V) for _ in range(args.open_tokens)]
                h = ask(ws, {"op": "open", "sid": 1, "rows": [len(ids)], "format": "topk", "k": 5}, P.pack_int32(ids))
                counts["long_opens" if h["op"] == "logits" else "busy"] += 1
                ask(ws, {"op": "close", "sid": 1})
                if done.is_set():
                    break
                flat = prompt * R + [rng.randrange(V) for _ in range(R * n)]
                h = ask(ws, {"op": "open", "sid": 1, "rows": [len(prompt)] * R, "format": "topk", "k": 5, "replay": n},
                        P.pack_int32(flat))
                counts["replays" if h["op"] == "logits" else "busy"] += 1
                ask(ws, {"op": "close", "sid": 1})

    def at_the_limits():
        R, L = limits["max_rows"], limits["max_prompt_tokens"]
        with connect(url, compression=None, max_size=None, ping_interval=None) as ws:
            while not stop.is_set():
                h = ask(ws, {"op": "open", "sid": 1, "rows": [L] * R, "format": "full", "dtype": "float32"},
                        P.pack_int32([7] * (R * L)))
                key = "limit_opens_busy" if h.get("code") == "busy" else "limit_opens_served"
                counts[key] = counts.get(key, 0) + 1
                if h["op"] == "logits":
                    ask(ws, {"op": "close", "sid": 1})
                stop.wait(0.2)

    unread = []

    def unread_scores():  # never reads: each answer (16 x 64 x V float32) waits on the server
        ws = connect(url, compression=None, max_size=None, max_queue=1, ping_interval=None).__enter__()
        unread.append(ws)
        ws.send(P.encode({"op": "open", "sid": 1, "rows": [len(prompt)] * 16, "format": "full", "dtype": "float32"},
                         P.pack_int32(prompt * 16)))
        for _ in range(3):
            ws.send(P.encode(*score_frame(1, [[5] * 64] * 16)))
            counts["unread_scores_sent"] += 1

    def ms(lat):
        return {"p50": round(_pct(lat, 50), 1), "p99": round(_pct(lat, 99), 1), "max": round(max(lat), 1)}

    # 1) fairness: the victim beside one client doing maximum-size opens and replays
    done = threading.Event()
    t = threading.Thread(target=opens_and_replays, args=(done,), daemon=True)
    t.start()
    time.sleep(args.hostile_warmup)
    beside = victim(args.victim_steps)
    done.set()
    fair_counts = dict(counts)
    # 2) memory: every hostile client at once (the fairness client too), RSS sampled all along
    done2 = threading.Event()
    threads = [threading.Thread(target=opens_and_replays, args=(done2,), daemon=True),
               threading.Thread(target=at_the_limits, daemon=True)]
    threads += [threading.Thread(target=unread_scores, daemon=True) for _ in range(args.unread_clients)]
    for th in threads:
        th.start()
    time.sleep(args.hostile_warmup)
    all_hostile = victim(args.victim_steps)
    stop.set()
    done2.set()
    for ws in unread:
        ws.close()
    # the hostile threads are daemons blocked on their current request: the server's exit ends them
    report.update(victim_steps=args.victim_steps, open_tokens=args.open_tokens,
                  replay=f"{args.replay_rows} rows x {args.replay_steps} steps",
                  hostile_during_fairness=fair_counts, hostile_in_all=counts,
                  victim_solo_ms=ms(solo), victim_beside_opens_and_replays_ms=ms(beside),
                  victim_beside_all_hostile_clients_ms=ms(all_hostile))
    report["p99_ratio"] = round(report["victim_beside_opens_and_replays_ms"]["p99"] / report["victim_solo_ms"]["p99"], 2)
    peak = max(r for _, r in samples) / 1024
    bound = 1.1 * (report["memory_budget_mb"] + report["rss_after_load_mb"])
    report.update(peak_rss_sampled_mb=round(peak, 1), peak_rss_mb=round(rss_kb(proc.pid, "VmHWM") / 1024, 1),
                  rss_bound_mb=round(bound, 1), rss_within_bound=rss_kb(proc.pid, "VmHWM") / 1024 <= bound,
                  p99_within_3x=report["p99_ratio"] < 3)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--sessions", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--max-total-sessions", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="server torch threads")
    ap.add_argument("--json", default=None)
    ap.add_argument("--hostile", action="store_true", help="victim latency and memory beside hostile clients")
    ap.add_argument("--memory-budget", default=None, help="server --memory-budget")
    ap.add_argument("--prefill-chunk", type=int, default=None, help="server --prefill-chunk")
    ap.add_argument("--victim-steps", type=int, default=40)
    ap.add_argument("--open-tokens", type=int, default=4096)
    ap.add_argument("--replay-rows", type=int, default=16)
    ap.add_argument("--replay-steps", type=int, default=510)
    ap.add_argument("--unread-clients", type=int, default=4)
    ap.add_argument("--hostile-warmup", type=float, default=2.0, help="seconds of hostile load before measuring")
    args = ap.parse_args()

    cmd = [sys.executable, "-m", "costeer", "serve", "--model", args.model, "--host", "127.0.0.1", "--port", "0",
           "--max-total-sessions", str(args.max_total_sessions), "--max-sessions", "8"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.memory_budget:
        cmd += ["--memory-budget", args.memory_budget]
    if args.prefill_chunk:
        cmd += ["--prefill-chunk", str(args.prefill_chunk)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=ROOT)
    url = None
    while url is None:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            sys.exit("costeer serve did not start")
        if "listening on ws://" in line:
            url = line.split("listening on ")[1].split()[0]
    samples, stop = [], threading.Event()

    def sampler():
        while not stop.is_set():
            samples.append((time.time(), rss_kb(proc.pid)))
            time.sleep(0.1)

    threading.Thread(target=sampler, daemon=True).start()
    report = {"model": args.model, "url": url, "rss_after_load_mb": rss_kb(proc.pid) / 1024}
    try:
        if args.hostile:
            hostile(args, url, proc, report, samples)
            report["rss_after_load_mb"] = round(report["rss_after_load_mb"], 1)
            print(json.dumps(report, indent=1), flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(report, f, indent=1)
            return
        tok = load_tokenizer(args.model)
        prompts = [chat_ids(tok, f"Tell me about {t} in {i + 3} words.") for i, t in enumerate(TOPICS)]
        s = WebSocketLLMStream(url, response_format="topk", k=5)
        solo = [greedy(s, p, args.steps) for p in prompts]
        s.close()

        # 1) hold the server's session limit at once, then one more is "busy"
        streams = []
        held = 0
        for c in range(args.max_total_sessions // 8):
            st = WebSocketLLMStream(url, response_format="topk", k=5)
            streams.append(st)
            for j in range(8):
                st._ws.send(P.encode({"op": "open", "sid": 1000 + j, "rows": [len(prompts[j])], "format": "topk",
                                      "k": 5}, P.pack_int32(prompts[j])))
            for j in range(8):
                held += st._recv_frame()[0]["op"] == "logits"
        extra = WebSocketLLMStream(url, response_format="topk", k=5)
        extra.open([prompts[0]])
        try:
            extra.recv()
            busy = "not refused"
        except StreamError as exc:
            busy = str(exc)
        extra.close()
        for st in streams:
            st.close()
        report.update(sessions_held_at_once=held, one_more=busy, rss_holding_mb=max(r for _, r in samples) / 1024)
        time.sleep(0.5)

        # 2) N sessions, C at a time
        done = [0]
        mismatches, errors = [0], []
        lock = threading.Lock()
        marks = {}
        next_i = [0]

        def worker():
            st = WebSocketLLMStream(url, response_format="topk", k=5)
            while True:
                with lock:
                    i = next_i[0]
                    if i >= args.sessions:
                        break
                    next_i[0] += 1
                try:
                    toks = greedy(st, prompts[i % len(prompts)], args.steps)
                except Exception as exc:  # noqa: BLE001
                    errors.append(repr(exc))
                    continue
                with lock:
                    mismatches[0] += toks != solo[i % len(prompts)]
                    done[0] += 1
                    if done[0] in (100, args.sessions // 2, args.sessions):
                        marks[done[0]] = rss_kb(proc.pid) / 1024
                    if done[0] % 100 == 0:
                        print(f"{done[0]} sessions, {time.time() - t0:.0f} s, server RSS "
                              f"{rss_kb(proc.pid) / 1024:.0f} MB", file=sys.stderr, flush=True)
            st.close()

        t0 = time.time()
        ws = [threading.Thread(target=worker) for _ in range(args.concurrency)]
        for w in ws:
            w.start()
        for w in ws:
            w.join()
        wall = time.time() - t0
        stop.set()
        report.update(sessions=done[0], concurrency=args.concurrency, steps_per_session=args.steps,
                      mismatches=mismatches[0], errors=len(errors), first_errors=errors[:3], wall_s=round(wall, 1),
                      sessions_per_s=round(done[0] / wall, 1),
                      rss_mb_after={str(k): round(v, 1) for k, v in sorted(marks.items())},
                      peak_rss_mb=round(rss_kb(proc.pid, "VmHWM") / 1024, 1),
                      rss_end_mb=round(rss_kb(proc.pid) / 1024, 1))
        report["rss_after_load_mb"] = round(report["rss_after_load_mb"], 1)
        report["rss_holding_mb"] = round(report.get("rss_holding_mb", 0), 1)
        print(json.dumps(report, indent=1), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
    finally:
        stop.set()
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


if __name__ == "__main__":
    main()
