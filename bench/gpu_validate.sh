#!/usr/bin/env bash
# GPU validation: on a machine with a CUDA GPU, build the CUDA extension, run the GPU tests and
# the kernel benchmarks, and write the report to bench/results/<gpu>/ and bench/GPU_REPORT.md.
#   bash bench/gpu_validate.sh            (no network needed once the package's deps are present)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
out=bench/GPU_REPORT.md
status=0
python - <<'PY' || { echo "no CUDA device: nothing to validate" >&2; exit 2; }
import torch, sys
sys.exit(0 if torch.cuda.is_available() else 1)
PY
{
  echo "# GPU validation report"
  echo
  echo "Date: $(date -u +%Y-%m-%dT%H:%MZ), git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | head -3
  python -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  echo '```'
} > "$out"

echo "== build the extensions in place" | tee -a /dev/stderr
if python setup.py build_ext --inplace > /tmp/costeer_build.log 2>&1; then
  echo "- build: ok" >> "$out"
else
  echo "- build: FAILED (tail of the log below)" >> "$out"; echo '```' >> "$out"; tail -30 /tmp/costeer_build.log >> "$out"; echo '```' >> "$out"
  status=1
fi
python -c "import costeer_kernels as ck; print('backends:', ck.available_backends())" >> "$out" 2>&1

echo "== tests on the GPU" | tee -a /dev/stderr
python -m pytest -q -x tests/kernels -p no:cacheprovider > /tmp/costeer_gpu_tests.log 2>&1
rc=$?
echo "- tests/kernels on the GPU: exit $rc, $(tail -1 /tmp/costeer_gpu_tests.log)" >> "$out"
if [ $rc -ne 0 ]; then echo '```' >> "$out"; grep -E "^(FAILED|ERROR)" /tmp/costeer_gpu_tests.log | head -40 >> "$out"; echo '```' >> "$out"; status=1; fi

echo "== kernel benchmarks" | tee -a /dev/stderr
for preset in op; do
  python bench/bench_kernels.py --preset "$preset" > "/tmp/costeer_bench_$preset.log" 2>&1 || status=1
done
python bench/bench_kernels.py --batches 1 4 16 64 256 --vocabs 151936 --dtypes bf16 fp32 --no-reference \
  --name kernels_gpu_sweep > /tmp/costeer_bench_sweep.log 2>&1 || status=1
res=$(ls -d bench/results/*/ 2>/dev/null | while read d; do [ -f "$d/kernels_op.json" ] && echo "$d"; done | xargs -r ls -td | head -1)
if [ -n "$res" ]; then
  { echo; cat "$res/kernels_op.md"; echo; [ -f "$res/kernels_gpu_sweep.md" ] && cat "$res/kernels_gpu_sweep.md"; } >> "$out"
fi
for extra in bench/bench_projection.py bench/bench_sampling.py; do
  if [ -f "$extra" ]; then
    { echo; echo "### $extra"; echo '```'; timeout 600 python "$extra" 2>&1 | tail -40; echo '```'; } >> "$out"
  fi
done
echo "wrote $out (status $status)"
exit $status
