"""The C++/CUDA backends ("cpu", "cuda"): torch.ops.costeer_ext.steer from csrc/.

Loaded from the extension ``costeer_kernels._C`` that ``setup.py`` builds in place, or, when it is
missing or older than the sources, compiled just in time from csrc/ with
``torch.utils.cpp_extension.load`` (ninja; cached under the torch extensions directory, or
``$COSTEER_BUILD_DIR``). ``COSTEER_NO_JIT=1`` disables the JIT build. Nothing here raises: a
failure marks the backends unavailable with the reason (see ``build_status()``).
"""
from __future__ import annotations

import importlib.util
import os
import threading
from pathlib import Path

import torch

from . import registry

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
CPU_SOURCES = ("steer_cpu.cpp", "sample_cpu.cpp", "cpu_isa.cpp", "linear_cpu.cpp", "attention_cpu.cpp", "bindings.cpp")
HEADERS = ("steer_math.h", "steer_cpu.h", "steer_cuda.h", "cpu_loops.inc", "cpu_simd.inc")
# Same flags as setup.py: no -march=native, the AVX2/AVX-512 paths are target regions of
# csrc/cpu_isa.cpp chosen at run time (cpu_isa()).
# -fopenmp: at::parallel_for is an inline `omp parallel` (serial without it); it links torch's own
# libgomp.so.1, already loaded by libtorch_cpu.
CXX_FLAGS = ["-O3", "-fopenmp"]
LD_FLAGS = ["-fopenmp"]
JIT_NAME = "costeer_ext_cpu"

_lock = threading.Lock()
_state = {"loaded": False, "source": None, "reason": None, "path": None}


def _prebuilt_path():
    spec = importlib.util.find_spec("costeer_kernels._C")
    return None if spec is None or not spec.origin else Path(spec.origin)


def _sources_newer_than(path: Path) -> bool:
    if not CSRC.is_dir():
        return False
    built = path.stat().st_mtime
    return any((CSRC / f).exists() and (CSRC / f).stat().st_mtime > built for f in CPU_SOURCES + HEADERS + ("steer_cuda.cu",))


def _jit_build():
    from torch.utils.cpp_extension import load

    build_dir = os.environ.get("COSTEER_BUILD_DIR")
    kwargs = {}
    if build_dir:
        os.makedirs(build_dir, exist_ok=True)
        kwargs["build_directory"] = build_dir
    return load(
        name=JIT_NAME,
        sources=[str(CSRC / f) for f in CPU_SOURCES],
        extra_cflags=CXX_FLAGS,
        extra_ldflags=LD_FLAGS,
        extra_include_paths=[str(CSRC)],
        is_python_module=False,
        verbose=os.environ.get("COSTEER_BUILD_VERBOSE") == "1",
        **kwargs,
    )


def cpu_vendor() -> str:
    """The CPU's vendor string ("GenuineIntel", "AuthenticAMD", ...; "" where /proc/cpuinfo does not
    say): what the CPU kernels' vendor-dependent defaults go by (csrc/cpu_isa.cpp asks the
    compiler's __builtin_cpu_is for the same)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def load_extension() -> bool:
    """Load the ops once (prebuilt, else JIT); True when torch.ops.costeer_ext.steer exists."""
    with _lock:
        if _state["loaded"] or _state["reason"] is not None:
            return _state["loaded"]
        notes = []
        try:
            path = _prebuilt_path()
            if path is not None and _sources_newer_than(path):
                notes.append(f"prebuilt {path.name} is older than csrc/, rebuilt just in time")
                path = None
            if path is not None:
                torch.ops.load_library(str(path))
                _state.update(source="prebuilt", path=str(path))
            elif os.environ.get("COSTEER_NO_JIT") == "1":
                raise RuntimeError("no prebuilt costeer_kernels._C and COSTEER_NO_JIT=1")
            elif not CSRC.is_dir():
                raise RuntimeError(f"no prebuilt costeer_kernels._C and no sources at {CSRC}")
            else:
                _jit_build()
                _state.update(source="jit")
            torch.ops.costeer_ext.steer  # noqa: B018 - raises if the library did not register
            _state["loaded"] = True
            if notes:
                _state["source"] += f" ({'; '.join(notes)})"
        except Exception as exc:  # noqa: BLE001 - any build/load failure only disables the backend
            _state["reason"] = f"C++ extension could not be built or loaded: {type(exc).__name__}: {exc}"
        return _state["loaded"]


def has_cuda_kernel() -> bool:
    return load_extension() and torch._C._dispatch_has_kernel_for_dispatch_key("costeer_ext::steer", "CUDA")


def build_status() -> dict:
    """{"loaded": bool, "source": "prebuilt" | "jit" | None, "reason": why not, "cuda": bool}."""
    load_extension()
    return dict(_state, cuda=bool(_state["loaded"] and has_cuda_kernel()))


def _call(zl, zc, zn, hp, out, mode, num_splits=0):
    return torch.ops.costeer_ext.steer(zl, zc, zn, hp, out, mode, num_splits)


def steer_cpp(zl, zc, zn, hp, out, mode: str = "closed_form", *, num_splits: int = 0) -> torch.Tensor:
    """The backend function of "cpu" and "cuda" (the registry's ``steer`` contract); num_splits: blocks
    (CUDA) or tasks (CPU) per row, 0 = automatic."""
    return _call(zl, zc, zn, hp, out, mode, num_splits)


def sample_cpp(zl, zc, zn, hp, params, want_maxp: bool, num_samples: int = 1):
    """The "cpu" sampler of ``steer_sample`` (the registry's ``sample`` contract): one pass for greedy
    rows, the [B, V] log-probs never written."""
    tok, lp, maxp, status = torch.ops.costeer_ext.sample(
        zl, zc, zn, hp, params.temperature, params.top_k, params.top_p, params.min_p,
        params.seed, params.offset, bool(params.row_keyed), bool(want_maxp), int(num_samples))
    return tok, lp, (maxp if want_maxp else None), status


def steer_hidden_cpp(zl, hdiff, weight, hp, out, num_splits: int = 0) -> torch.Tensor:
    """The CPU projection fused into the steer kernel: W @ hdiff computed chunk by chunk (no
    small-model logits in memory); ``hdiff`` float32 [B, H]; returns the status [B]."""
    return torch.ops.costeer_ext.steer_hidden(zl, hdiff, weight, hp, out, num_splits)


def steer_hidden_kernel(zl, hc, hn, weight, hp, out, slm_index=None, drop=False) -> torch.Tensor:
    """The registry's ``steer_hidden`` contract on the C++ kernel (no vocabulary map)."""
    return steer_hidden_cpp(zl, hc.float() - hn.float(), weight, hp, out)


def sample_hidden_kernel(zl, hc, hn, weight, hp, params, want_maxp: bool, num_samples: int = 1):
    """The registry's ``sample_hidden`` contract: W (h_c - h_n), steer and sample in one sweep."""
    tok, lp, maxp, status = torch.ops.costeer_ext.sample_hidden(
        zl, hc.float() - hn.float(), weight, hp, params.temperature, params.top_k, params.top_p, params.min_p,
        params.seed, params.offset, bool(params.row_keyed), bool(want_maxp), int(num_samples))
    return tok, lp, (maxp if want_maxp else None), status


def linear_cpp(x, weight, bias):
    """The registry's ``linear`` contract on the C++ kernel: float32 rows, the weight (float, or
    GGML Q8_0, Q5_0 or Q4_1 blocks) streamed once."""
    rows = x if x.dtype == torch.float32 and x.stride(-1) == 1 else x.float().contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    out = torch.empty(rows.shape[0], weight.shape[0], dtype=torch.float32, device=rows.device)
    torch.ops.costeer_ext.linear_rows(rows, weight, bias, out)
    return out if x.dtype == torch.float32 else out.to(x.dtype)


def attention_cpp(q, k, v, mask, scale):
    """The registry's ``attention`` contract on the C++ kernel (float32; any other dtype is
    widened and the result narrowed back)."""
    dt = q.dtype
    if dt != torch.float32:
        q, k, v = q.float(), k.float(), v.float()
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    if mask is not None and mask.dtype != torch.bool and mask.dtype != torch.float32:
        mask = mask.float()
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    torch.ops.costeer_ext.decode_attention(q, k, v, mask, float(scale), out)
    return out if dt == torch.float32 else out.to(dt)


def register_backends() -> None:
    """Register "cpu" (and "cuda" when built with it) in the backend registry, or record why not."""
    if not load_extension():
        registry.mark_unavailable("cpu", _state["reason"])
        registry.mark_unavailable("cuda", _state["reason"])
        return
    registry.register_backend("cpu", registry.on_cpu, steer=steer_cpp, sample=sample_cpp,
                              steer_hidden=steer_hidden_kernel, sample_hidden=sample_hidden_kernel,
                              linear=linear_cpp, attention=attention_cpp)
    if has_cuda_kernel():
        registry.register_backend("cuda", registry.on_cuda, steer=steer_cpp)
    elif not torch.cuda.is_available():
        registry.mark_unavailable("cuda", "no CUDA device (torch.cuda.is_available() is False)")
    else:
        registry.mark_unavailable("cuda", f"the costeer_ext library ({_state['source']}) was built without CUDA")
