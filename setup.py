"""Build script. Package metadata lives in pyproject.toml; this file only adds the C++/CUDA
extension ``costeer_kernels._C`` (csrc/, torch.ops.costeer_ext.steer).

- torch importable at build time (``pip install --no-build-isolation``): the CPU extension is built
  with ninja; the CUDA kernels are added only when this torch has CUDA and nvcc is found.
- otherwise (or COSTEER_NO_EXTENSION=1, or the build fails): the pure-Python package installs and
  costeer_kernels/_extension.py compiles the CPU extension just in time on first use.
"""
import os
import shutil
import sys

from setuptools import setup

# Same flags as the just-in-time build (costeer_kernels/_extension.py): no -march=native in a
# prebuilt binary, the AVX2/AVX-512 paths are target regions chosen at run time (csrc/cpu_isa.cpp).
CXX_FLAGS = ["-O3", "-fopenmp"]
NVCC_FLAGS = [
    "-O3",
    "-std=c++17",
    "-gencode", "arch=compute_80,code=sm_80",
    "-gencode", "arch=compute_90,code=sm_90",
    "-gencode", "arch=compute_90,code=compute_90",
]


def _extensions():
    if os.environ.get("COSTEER_NO_EXTENSION") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception:  # noqa: BLE001 - no torch at build time: pure-Python install, JIT later
        return [], {}
    sources = ["csrc/steer_cpu.cpp", "csrc/sample_cpu.cpp", "csrc/cpu_isa.cpp", "csrc/linear_cpu.cpp", "csrc/attention_cpu.cpp", "csrc/bindings.cpp"]
    cxx = list(CXX_FLAGS)
    nvcc_path = shutil.which("nvcc") or (
        os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc") if cpp_extension.CUDA_HOME else None
    )
    with_cuda = bool(torch.version.cuda) and nvcc_path is not None and os.path.exists(nvcc_path)
    if os.environ.get("COSTEER_NO_CUDA") == "1":
        with_cuda = False
    kwargs = dict(include_dirs=[os.path.abspath("csrc")], extra_link_args=["-fopenmp"])
    if with_cuda:
        ext = cpp_extension.CUDAExtension(
            "costeer_kernels._C",
            sources + ["csrc/steer_cuda.cu"],
            define_macros=[("COSTEER_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": NVCC_FLAGS},
            **kwargs,
        )
    else:
        ext = cpp_extension.CppExtension("costeer_kernels._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)

    class OptionalBuildExt(build_ext):
        """A failed compile leaves the pure-Python package (the JIT path retries at runtime)."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001
                print(f"costeer: building the C++ extension failed ({exc}); it will be compiled "
                      "just in time on first use", file=sys.stderr)

    return [ext], {"build_ext": OptionalBuildExt}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
