"""`costeer serve` under load: sessions held at once, the "busy" limit, and N sessions in a row with
C concurrent clients; the server's resident memory is sampled all along (peak = VmHWM).

    python bench/server_load.py [--model smollm2] [--sessions 1000] [--concurrency 32] [--steps 4]

Every session decodes greedily from one of 8 prompts; its tokens must equal the solo run of that
prompt (computed first, one session at a time), so "mismatches" counts sessions that were not
isolated. The server runs in a subprocess on 127.0.0.1 and shares the CPU cores with the clients.
Prints one JSON object (also written to --json if given).

    python bench/server_load.py --hostile [--model smollm2] [--memory-budget 2GiB] [--threads 1] [--phase-seconds 60]

Hostile clients (issue 18). Four phases, each with a fresh victim session (a 1-row chat prompt,
top-k answers) whose step latency (send to answer) is timed for at most --victim-steps steps or
--phase-seconds s, whichever comes first, after --hostile-warmup s of hostile load: (1) alone;
(2) beside one client doing maximum-size opens (--open-tokens, one after the other); (3) beside
one client doing full-size replays (--replay-rows x --replay-steps); (4) beside all of them at once
plus a client opening at every limit (max rows x max prompt tokens, float32: refused by the memory
budget) and --unread-clients clients leaving 16 x 64 float32 score answers unread (201 MB each
for SmolLM2; the server's --send-timeout defaults to 300 s here so they stay held), this phase
lasting --memory-seconds so those answers get computed. At the end of each phase the hostile connections are closed, which stops their work on the server. Reports
p50/p99 per phase, the fairness target (worst p99 of phases 2 and 3 < 3x the solo p99), and the
server's peak RSS (VmHWM, over all phases) against budget + model size (RSS after loading) + 10%.
The budget defaults to 2GiB here so the figure does not depend on the machine's free memory.
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
from costeer.serve import protocol as P  # noqa: E402
from costeer.loop import chat_ids  # noqa: E402
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


def machine():
    """CPU model and core count (the figures' machine)."""
    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores"


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

    from costeer.serve.protocol import score_frame

    hello = WebSocketLLMStream(url, response_format="topk", k=5)
    limits = hello.info["limits"]
    hello.close()
    V = hello.vocab_size
    report.update(memory_budget_mb=round(limits["memory_budget_bytes"] / 2**20, 1),
                  kv_bytes_per_token=limits["kv_bytes_per_token"], prefill_chunk=limits["prefill_chunk"],
                  victim_steps=args.victim_steps, phase_seconds=args.phase_seconds, open_tokens=args.open_tokens,
                  memory_phase_seconds=args.memory_seconds, server_send_timeout_s=args.send_timeout,
                  replay=f"{args.replay_rows} rows x {args.replay_steps} steps")
    tok = load_tokenizer(args.model)
    prompt = chat_ids(tok, "Tell me about rivers in 40 words.")
    counts = {}
    rng = random.Random(0)
    conns = []  # every hostile connection: closed at the end of its phase (the server drops its work)
    phase_over = threading.Event()

    def count(key):
        counts[key] = counts.get(key, 0) + 1

    def ask(ws, header, payload=b""):
        ws.send(P.encode(header, payload))
        return P.decode(ws.recv(timeout=3600))[0]

    def hostile_client(body):
        def run():
            # an unread client buffers at most one answer of its own, so the rest wait on the server
            queue = {"max_queue": 1} if body is unread_scores else {}
            ws = connect(url, compression=None, max_size=None, ping_interval=None, close_timeout=1,
                         **queue).__enter__()
            conns.append(ws)
            try:
                body(ws)
            except Exception:  # noqa: BLE001 - its connection was closed at the end of the phase
                pass
        th = threading.Thread(target=run, daemon=True)
        th.start()
        return th

    def long_opens(ws):  # maximum-size opens (--open-tokens, one row), one after the other
        while True:
            ids = [rng.randrange(V) for _ in range(args.open_tokens)]
            h = ask(ws, {"op": "open", "sid": 1, "rows": [len(ids)], "format": "topk", "k": 5}, P.pack_int32(ids))
            count("long_opens" if h["op"] == "logits" else "long_opens_" + h.get("code", "error"))
            ask(ws, {"op": "close", "sid": 1})

    def replays(ws):  # full-size replays (--replay-rows x --replay-steps), one after the other
        R, n = args.replay_rows, args.replay_steps
        while True:
            flat = prompt * R + [rng.randrange(V) for _ in range(R * n)]
            h = ask(ws, {"op": "open", "sid": 1, "rows": [len(prompt)] * R, "format": "topk", "k": 5, "replay": n},
                    P.pack_int32(flat))
            count("replays" if h["op"] == "logits" else "replays_" + h.get("code", "error"))
            ask(ws, {"op": "close", "sid": 1})

    def at_the_limits(ws):  # max rows x max prompt tokens, full float32 answers: the budget refuses
        R, L = limits["max_rows"], limits["max_prompt_tokens"]
        while not phase_over.is_set():  # counted during the phase only, not while it is torn down
            h = ask(ws, {"op": "open", "sid": 1, "rows": [L] * R, "format": "full", "dtype": "float32"},
                    P.pack_int32([7] * (R * L)))
            count("limit_opens_" + (h.get("code", "error") if h["op"] != "logits" else "served"))
            if h["op"] == "logits":
                ask(ws, {"op": "close", "sid": 1})
            phase_over.wait(0.2)

    def unread_scores(ws):  # never reads: each answer (16 x 64 x V float32) waits on the server
        # one-token rows: its compute goes to the score answers (16 x 64 rows of logits each)
        ws.send(P.encode({"op": "open", "sid": 1, "rows": [1] * 16, "format": "full", "dtype": "float32"},
                         P.pack_int32(prompt[:1] * 16)))
        for _ in range(3):
            ws.send(P.encode(*score_frame(1, [[5] * 64] * 16)))
            count("unread_scores_sent")
        phase_over.wait()

    def phase(name, bodies, hold=0.0):
        """Open the victim's session, start the hostile clients, let them load the server for
        --hostile-warmup s, then time the victim's steps (at most --victim-steps, or until
        --phase-seconds have passed); keep the hostile load until ``hold`` s after it started;
        then close every hostile connection."""
        counts.clear()
        phase_over.clear()
        load0, t_start = os.getloadavg()[0], time.time()
        s = WebSocketLLMStream(url, response_format="topk", k=5, timeout=3600)
        s.open([prompt])
        out = s.recv()
        for _ in range(3):  # warm-up steps
            s.send([int(out.logits[0].argmax())])
            out = s.recv()
        threads = [hostile_client(b) for b in bodies]
        started = time.time()
        if bodies:
            time.sleep(args.hostile_warmup)
        deadline, lat = time.time() + args.phase_seconds, []
        while len(lat) < args.victim_steps and time.time() < deadline:
            t0 = time.perf_counter()
            s.send([int(out.logits[0].argmax())])
            out = s.recv()
            lat.append((time.perf_counter() - t0) * 1e3)
        s.finish()
        s.close()
        time.sleep(max(0.0, started + hold - time.time()))
        phase_over.set()
        for ws in list(conns):
            ws.close()
        for th in threads:
            th.join(60)
        conns.clear()
        report[name] = {"steps": len(lat), "p50_ms": round(_pct(lat, 50), 1), "p99_ms": round(_pct(lat, 99), 1),
                        "max_ms": round(max(lat), 1), "hostile": dict(counts), "seconds": round(time.time() - t_start),
                        "peak_rss_sampled_mb": round(max(r for t, r in samples if t >= t_start) / 1024, 1),
                        "load_avg_1min": [round(load0, 2), round(os.getloadavg()[0], 2)]}
        time.sleep(1.0)  # the server lets go of the closed connections' work

    phase("victim_solo", [])
    phase("victim_beside_long_opens", [long_opens])
    phase("victim_beside_replays", [replays])
    phase("victim_beside_all_hostile_clients",
          [unread_scores] * args.unread_clients + [long_opens, replays, at_the_limits], hold=args.memory_seconds)
    solo = report["victim_solo"]["p99_ms"]
    worst = max(report["victim_beside_long_opens"]["p99_ms"], report["victim_beside_replays"]["p99_ms"])
    report["p99_ratio_worst_of_opens_and_replays"] = round(worst / solo, 2)
    peak = max(r for _, r in samples) / 1024
    bound = 1.1 * (report["memory_budget_mb"] + report["rss_after_load_mb"])
    hwm = rss_kb(proc.pid, "VmHWM") / 1024
    report.update(peak_rss_sampled_mb=round(peak, 1), peak_rss_mb=round(hwm, 1), rss_bound_mb=round(bound, 1),
                  rss_within_bound=hwm <= bound, p99_within_3x=worst < 3 * solo)


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
    ap.add_argument("--memory-budget", default=None,
                    help="server --memory-budget (--hostile: default 2GiB, so the figure does not depend on "
                         "the machine's free memory)")
    ap.add_argument("--prefill-chunk", type=int, default=None, help="server --prefill-chunk")
    ap.add_argument("--victim-steps", type=int, default=30)
    ap.add_argument("--phase-seconds", type=float, default=60.0, help="time limit of each victim phase")
    ap.add_argument("--open-tokens", type=int, default=4096)
    ap.add_argument("--replay-rows", type=int, default=16)
    ap.add_argument("--replay-steps", type=int, default=510)
    ap.add_argument("--unread-clients", type=int, default=4)
    ap.add_argument("--memory-seconds", type=float, default=150.0,
                    help="--hostile: seconds the last phase (all hostile clients) lasts, so the unread answers "
                         "are computed and held")
    ap.add_argument("--send-timeout", type=float, default=None,
                    help="server --send-timeout (--hostile: default 300 s, so unread answers stay held)")
    ap.add_argument("--hostile-warmup", type=float, default=2.0, help="seconds of hostile load before measuring")
    args = ap.parse_args()

    cmd = [sys.executable, "-m", "costeer", "serve", "--model", args.model, "--host", "127.0.0.1", "--port", "0",
           "--max-total-sessions", str(args.max_total_sessions), "--max-sessions", "8"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.hostile and not args.memory_budget:
        args.memory_budget = "2GiB"
    if args.memory_budget:
        cmd += ["--memory-budget", args.memory_budget]
    if args.hostile and args.send_timeout is None:
        args.send_timeout = 300.0
    if args.send_timeout:
        cmd += ["--send-timeout", str(args.send_timeout)]
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
    report = {"model": args.model, "machine": machine(), "server_threads": args.threads, "url": url,
              "rss_after_load_mb": rss_kb(proc.pid) / 1024}
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
