"""Fault injection: `costeer serve` SIGKILLed and restarted mid-generation, connections cut, and the
generating `costeer generate --output` process SIGKILLed and resumed; every run must end with the
output of an uninterrupted run.

    python bench/faults.py [--kills 10] [--drops 100] [--cli-kills 5] [--model DIR]

The default model is the tiny random Llama of the tests (tests/costeer/tiny.py, built in /tmp), so
a restart costs the Python + transformers start-up only. Prints one JSON object.
"""
import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from costeer import Generator  # noqa: E402
from costeer.cli import CLI_DEFAULTS  # noqa: E402
from costeer.models import load_model  # noqa: E402
from costeer_kernels import SteerConfig  # noqa: E402
from tests.costeer.tiny import free_port, make_tiny_model  # noqa: E402

PROMPT, CONTEXT = "Suggest a weekend activity.", "I love hiking and I live in Zurich."
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), TOKENIZERS_PARALLELISM="false")


class Server:
    def __init__(self, model, port):
        self.model, self.port, self.proc, self.lock = model, port, None, threading.Lock()

    def start(self):
        with self.lock:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "costeer", "serve", "--model", self.model, "--port", str(self.port),
                 "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ENV, cwd=ROOT)
            for line in self.proc.stdout:
                if "listening on ws://" in line:
                    return
            raise RuntimeError("costeer serve did not start")

    def kill(self):
        with self.lock:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)


def server_faults(model, loaded, n_tokens, kills, drops, rng):
    srv = Server(model, free_port())
    srv.start()
    url = f"ws://127.0.0.1:{srv.port}"
    gen = Generator(llm=None, slm=loaded, llm_url=url, cfg=SteerConfig(**CLI_DEFAULTS), transport_dtype="float32",
                    reconnect_timeout=120)
    ref = gen.generate(PROMPT, context=CONTEXT, max_new_tokens=n_tokens)
    kill_at = set(rng.sample(range(2, n_tokens - 1), kills))
    drop_at = set(rng.sample(sorted(set(range(1, n_tokens - 1)) - kill_at), drops))
    tokens, restarts, t0 = [], [], time.time()
    try:
        for chunk in gen.stream(PROMPT, context=CONTEXT, max_new_tokens=n_tokens):
            if chunk.token is not None:
                tokens.append(chunk.token)
            n = len(tokens)
            if chunk.done:
                res = chunk.result
            elif n in kill_at:
                kill_at.discard(n)
                srv.kill()
                t = threading.Timer(0.1, srv.start)
                t.start()
                restarts.append(t)
            elif n in drop_at:
                drop_at.discard(n)
                gen.connection._ws.socket.shutdown(socket.SHUT_RDWR)  # the connection is cut under the client
        for t in restarts:
            t.join()
        wall = time.time() - t0
        return {"tokens": n_tokens, "server_kills": kills, "connection_drops": drops,
                "reconnects": gen.connection.reconnects, "equal_to_uninterrupted": res.token_ids == ref.token_ids
                and res.text == ref.text, "wall_s": round(wall, 1)}
    finally:
        gen.close()
        srv.kill()


def cli_faults(model, n_tokens, cli_kills, rng, tmp):
    args = ["generate", "--llm", model, "--slm", model, "--prompt", PROMPT, "--context", CONTEXT,
            "--max-new-tokens", str(n_tokens), "--threads", "1", "--quiet"]
    ref, out = os.path.join(tmp, "ref.txt"), os.path.join(tmp, "out.txt")
    for p in (ref, ref + ".journal", out, out + ".journal"):
        if os.path.exists(p):
            os.remove(p)
    run = lambda extra, **kw: subprocess.Popen([sys.executable, "-m", "costeer"] + args + extra, env=ENV, cwd=ROOT,  # noqa: E731
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
    assert run(["--output", ref]).wait() == 0
    killed, runs = 0, 0
    extra = ["--output", out]
    while True:
        p = run(extra)
        runs += 1
        j = out + ".journal"
        have = open(j).read().count("\n") if os.path.exists(j) else 0
        target = have + rng.randrange(3, max(4, n_tokens // cli_kills)) if killed < cli_kills else None
        while p.poll() is None and target is not None:
            if os.path.exists(j) and open(j).read().count("\n") >= target:
                p.send_signal(signal.SIGKILL)
                killed += 1
                break
            time.sleep(0.003)
        p.wait()
        extra = ["--output", out, "--resume"]
        if p.returncode == 0:
            journal = open(out + ".journal").read()
            if '"done"' in journal:
                break
    same = open(out, "rb").read() == open(ref, "rb").read()
    return {"cli_kills": killed, "cli_runs": runs, "tokens": n_tokens, "file_equal_to_uninterrupted": same}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: the tests' tiny random Llama)")
    ap.add_argument("--tokens", type=int, default=120)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--drops", type=int, default=100)
    ap.add_argument("--cli-kills", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tmp", default="/tmp/costeer-faults")
    args = ap.parse_args()
    os.makedirs(args.tmp, exist_ok=True)
    model = args.model or make_tiny_model(os.path.join(args.tmp, "tiny"))
    rng = random.Random(args.seed)
    loaded = load_model(model)
    report = {"model": model, "server": server_faults(model, loaded, args.tokens, args.kills, args.drops, rng)}
    if args.cli_kills:
        report["cli"] = cli_faults(model, args.tokens, args.cli_kills, rng, args.tmp)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
