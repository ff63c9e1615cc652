"""The kernel benchmarks through pytest-benchmark: ``pytest bench --benchmark-only``.

Same cases as bench_kernels.py's default preset at B=1 and B=64 (V=151936), one per backend
available here; pytest-benchmark handles rounds, warmup and the statistics table.
"""
import pytest
import torch

import costeer_kernels as ck

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [b for b in ck.available_backends() if ck.registry._BACKENDS[b].runs_on(torch.device(DEVICE)) and (b != "triton" or DEVICE == "cuda")]


def _inputs(B, V, dtype):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, V, generator=g).mul_(3).to(DEVICE, dtype) for _ in range(3)]


@pytest.mark.parametrize("B", [1, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_steer(benchmark, backend, B, dtype):
    zl, zc, zn = _inputs(B, 151936, dtype)
    out = torch.empty(B, 151936, device=DEVICE)

    def run():
        ck.steer(zl, zc, zn, backend=backend, out=out, validate=False)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(bytes=B * 151936 * (3 * zl.element_size() + 4), threads=torch.get_num_threads())
    benchmark(run)


def test_reference_steer_b1(benchmark):
    zl, zc, zn = _inputs(1, 151936, torch.float32)
    benchmark.pedantic(ck.reference_steer, args=(zl, zc, zn), rounds=5, iterations=1)
