#!/usr/bin/env bash
# One prepared device check for a session that is lent a GPU (about 15 minutes of device time in all):
# parity on the GPU at highest precision, then the four benchmarks at the issues' sizes.
# Run from the repo root:  PYTHONPATH=. bash bench/gpu_check.sh   (outputs also go to $OUT when set)
set -u
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
LOG=${OUT:-/tmp}/gpu_check.log
run() { echo "=== $*" | tee -a "$LOG"; timeout "${STEP_TIMEOUT:-150}" "$@" 2>&1 | tee -a "$LOG"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG"
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" | tee -a "$LOG"
run python3 -m cosyjax.parity tests/golden --only hift,flow,llm
run python3 bench/bench_hift.py --frames 500 --reps 20 --precision both
run python3 bench/bench_flow.py --dtype both --tokens 250 --prompt 75 --reps 10
run python3 bench/bench_llm.py --version cosyvoice3 --dtypes bfloat16,float32 --batches 1,16 --tokens 250 --prompt 128
run python3 bench/bench_e2e.py --tokens 250 --batches 1,16 --dtype bfloat16 --reps 3
