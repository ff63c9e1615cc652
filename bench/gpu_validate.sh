#!/usr/bin/env bash
# GPU validation: on a machine with a CUDA GPU, build the CUDA extension, run the kernel tests on
# the GPU, run the kernel benchmarks and check the issues' GPU targets; writes bench/GPU_REPORT.md
# and bench/results/<gpu>/ (JSON, Markdown, PNG; logs under raw/).
#   bash bench/gpu_validate.sh            (no network needed once the package's deps are present)
# Each stage has a time budget (seconds; a stage past it is stopped and reported, the next runs):
#   COSTEER_GPU_BUILD_S (300)  COSTEER_GPU_TEST_S (900)  COSTEER_GPU_BENCH_S (900)
# COSTEER_GPU_TESTS: pytest targets (default tests/kernels); COSTEER_GPU_K: a pytest -k
# expression (e.g. "not cpu" leaves the CPU-kernel tests to CI); FUZZ_CASES (default here 300).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
export FUZZ_CASES=${FUZZ_CASES:-300}
PY=${PYTHON:-$(command -v python3 || command -v python)}
out=bench/GPU_REPORT.md
logs=$(mktemp -d /tmp/costeer_gpu.XXXX)
status=0
"$PY" - <<'PY' || { echo "no CUDA device: nothing to validate" >&2; exit 2; }
import torch, sys
sys.exit(0 if torch.cuda.is_available() else 1)
PY
stage() { echo "== $1 ($(date -u +%H:%M:%S))" >&2; }
since() { echo $(( $(date +%s) - $1 )); }
{
  echo "# GPU validation report"
  echo
  echo "Date: $(date -u +%Y-%m-%dT%H:%MZ), git $(git rev-parse --short HEAD 2>/dev/null || echo '(no git)'); command: \`bash bench/gpu_validate.sh\`"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | head -3
  "$PY" -c "import torch, triton, sys, os; p = torch.cuda.get_device_properties(0); print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, '| SMs', p.multi_processor_count, '| CPU cores', os.cpu_count())"
  echo '```'
  echo
} > "$out"

stage "build the extension in place (CPU + CUDA kernels)"
t0=$(date +%s)
if MAX_JOBS=$(nproc) timeout "${COSTEER_GPU_BUILD_S:-300}" "$PY" setup.py build_ext --inplace > "$logs/build.log" 2>&1 \
   && ls costeer_kernels/_C*.so > /dev/null 2>&1; then
  echo "- build: ok in $(since "$t0") s" >> "$out"
else
  echo "- build: FAILED after $(since "$t0") s (tail of the log below)" >> "$out"
  { echo '```'; tail -30 "$logs/build.log"; echo '```'; } >> "$out"
  status=1
fi
"$PY" - >> "$out" 2>&1 <<'PY'
import torch
import costeer_kernels as ck
from costeer_kernels import _extension
print("- backends:", ", ".join(ck.available_backends()), "| extension:", _extension.build_status() if hasattr(_extension, "build_status") else "?")
if "cuda" in ck.available_backends():
    g = torch.Generator(device="cpu").manual_seed(0)
    zl, zc, zn = (torch.randn(2, 151936, generator=g).mul_(3).to("cuda", torch.bfloat16) for _ in range(3))
    ref = ck.reference_steer(zl.double(), zc.double(), zn.double())
    for be in ("cuda", "triton"):
        err = (ck.steer(zl, zc, zn, backend=be).double() - ref).abs().max().item()
        print(f"- smoke: steer backend={be} B=2 V=151936 bf16, max |error| vs float64 reference: {err:.2e}")
PY

stage "kernel tests on the GPU"
t0=$(date +%s)
extra=()
"$PY" -c "import xdist" 2>/dev/null && extra+=(-n "$(( $(nproc) > 12 ? 12 : $(nproc) ))")
"$PY" -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout 180 --timeout-method thread)
timeout "${COSTEER_GPU_TEST_S:-900}" "$PY" -m pytest -v -rfEs --tb=short -p no:cacheprovider "${extra[@]}" \
  ${COSTEER_GPU_K:+-k "$COSTEER_GPU_K"} ${COSTEER_GPU_TESTS:-tests/kernels} \
  > "$logs/tests.log" 2>&1
rc=$?
summary=$(grep -E "(passed|failed|error)" "$logs/tests.log" | tail -1)
echo "- tests (${COSTEER_GPU_TESTS:-tests/kernels} ${COSTEER_GPU_K:+-k \"$COSTEER_GPU_K\"}, FUZZ_CASES=$FUZZ_CASES, ${extra[*]}): exit $rc in $(since "$t0") s: ${summary:-no summary (stopped at the time budget?)}" >> "$out"
if [ $rc -ne 0 ]; then
  { echo '```'; grep -E "^(FAILED|ERROR)|Timeout|crashed" "$logs/tests.log" | head -60
    grep -cE " (FAILED|ERROR) " "$logs/tests.log" | sed 's/^/failing tests seen in the progress lines: /'
    grep -E "PASSED|FAILED|SKIPPED" "$logs/tests.log" | wc -l | sed 's/^/tests reported before the end: /' ; echo '```'; } >> "$out"
  status=1
fi
{ echo; echo "Skipped on the GPU:"; echo '```'; grep -E "^SKIPPED" "$logs/tests.log" | head -20; echo '```'; } >> "$out"

stage "kernel benchmarks"
t0=$(date +%s)
budget=${COSTEER_GPU_BENCH_S:-900}
timeout "$budget" "$PY" bench/bench_kernels.py --preset op --compile-batches 1 > "$logs/bench_op.log" 2>&1 || status=1
left=$(( budget - $(since "$t0") ))
if [ "$left" -gt 20 ]; then
  timeout "$left" "$PY" bench/bench_gpu_tuning.py > "$logs/bench_tuning.log" 2>&1 || status=1
fi
left=$(( budget - $(since "$t0") ))
if [ "$left" -gt 20 ]; then
  timeout "$left" "$PY" bench/bench_kernels.py --batches 1 4 16 64 256 --vocabs 32000 151936 --dtypes bf16 fp32 \
    --no-reference --no-projection --name kernels_gpu_sweep > "$logs/bench_sweep.log" 2>&1 || status=1
fi
echo "- benchmarks: $(since "$t0") s" >> "$out"
res=$(ls -td bench/results/*/ 2>/dev/null | while read -r d; do [ -f "$d/kernels_op.json" ] && echo "$d"; done | head -1)
if [ -n "$res" ] && [ "$(find "$res/kernels_op.json" -newer "$logs/build.log" 2>/dev/null)" ]; then
  { echo; "$PY" bench/gpu_targets.py "$res/kernels_op.json"; cat "$res/kernels_op.md"; echo
    [ -f "$res/tuning.md" ] && { cat "$res/tuning.md"; echo; }
    [ -f "$res/kernels_gpu_sweep.md" ] && cat "$res/kernels_gpu_sweep.md"; } >> "$out"
  mkdir -p "$res/raw" && cp "$logs"/*.log "$res/raw/"
else
  { echo; echo "No kernel report was written; tail of the benchmark log:"; echo '```'; tail -30 "$logs/bench_op.log"; echo '```'; } >> "$out"
fi
echo "wrote $out (status $status); logs in $logs"
exit $status
