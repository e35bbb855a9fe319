#!/usr/bin/env bash
# One prepared device check for a session that is lent a GPU (about 15 minutes of device time in all):
# the attention micro-benchmark (first compile + run of the Pallas kernel on a GPU: its 'max rel vs xla'
# column is the check), parity on the GPU at highest precision, the CUDA lowering census, then the
# four benchmarks at the issues' sizes, and one summary: issue 11's targets and every result table row.
# Run from the repo root:  PYTHONPATH=. bash bench/gpu_check.sh   (outputs also go to $OUT when set)
# CPU dry run of the Python parts (tiny shapes):  bash bench/gpu_check.sh --cpu-smoke
set -u
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
LOG=${OUT:-/tmp}/gpu_check.log
: > "$LOG"
run() { echo "=== $*" | tee -a "$LOG"; timeout "${STEP_TIMEOUT:-150}" "$@" 2>&1 | tee -a "$LOG"; }
if [ "${1:-}" = "--cpu-smoke" ]; then
  run python3 bench/gpu_lowering.py --cpu-smoke --only flow_cv3,llm_prefill_cv3,llm_decode_program_cv3
  run python3 bench/bench_attention.py --cpu-smoke
  exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG"
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" | tee -a "$LOG"
# The attention micro-benchmark first: it is the first GPU compile of the Pallas kernel, which `auto`
# also picks for float32 attention on a GPU (i.e. inside the parity run below).
run python3 bench/bench_attention.py --reps 20
run python3 bench/bench_attention.py --reps 5 --dtype float32
run python3 -m cosyjax.parity tests/golden --only hift,flow,llm
run python3 bench/gpu_lowering.py --require-fused
run python3 bench/bench_hift.py --frames 500 --reps 20 --precision both
run python3 bench/bench_flow.py --dtype both --tokens 250 --prompt 75 --reps 10
run python3 bench/bench_llm.py --version cosyvoice3 --dtypes bfloat16,float32 --batches 1,16 --tokens 250 --prompt 128
run python3 bench/bench_e2e.py --tokens 250 --batches 1,16 --dtype bfloat16 --reps 3
{
  echo "=== summary: issue 11 targets (CV3, 10 s of audio) | where the measured number is"
  echo "| target | value | measured in |"
  echo "|---|---|---|"
  echo "| flow (bf16, batch 1) | <= 40 ms | bench_flow.py table |"
  echo "| HiFT | <= 10 ms | bench_hift.py table |"
  echo "| LLM decode | <= 1.5 ms/token | bench_llm.py 'decode ms/token' |"
  echo "| end-to-end RTF, batch 1 | <= 0.05 | bench_e2e.py RTF |"
  echo "| first streamed audio | <= 100 ms | bench_e2e.py TTFA ms |"
  echo "| end-to-end RTF, batch 16 | <= 0.01 | bench_e2e.py RTF |"
  echo "| every flow / prefill attention fused, 0 host callbacks | - | gpu_lowering.py table |"
  echo "| Pallas kernel = xla on GPU | bf16 max rel <= 1e-2 | bench_attention.py 'max rel vs xla' |"
  echo "=== all result table rows"
  grep -E '^\|' "$LOG" | grep -v -E '^\|[-| ]+\|$'
} | tee -a "$LOG.summary"
cat "$LOG.summary" >> "$LOG"
