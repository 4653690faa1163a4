#!/usr/bin/env bash
# One short GPU check of the CUDA path, for a bare GPU machine with python3 +
# torch (CUDA) but no gymnasium / MuJoCo / SB3: those come as wheels in .whl/ (made by
# scripts/fetch_gpu_wheels.sh) and are installed offline into /tmp/site.
#
#   bash scripts/gpu_check.sh            # cwd = repo root; results in $OUT (or ./gpu_check_out)
#
# Steps, each under `timeout` (the limits add up to 14 minutes):
#   1. nvidia-smi, python / torch / CUDA versions
#   2. pytest: tests/binom_rl/test_cuda.py, test_metagrad.py, test_chunk_size.py
#   3. scripts/benchmark_metastep.py full size on cuda, with a time budget
#   4. scripts/benchmark_metagrad.py --device cuda (quick sizes: cost + flatness tables)
#   5. scripts/train.py on HalfCheetahDir, cuda, 3 meta-iterations with 16 worker processes
#      and again with 1 (in-process rollout thread pool over all cores); the
#      time/sampling_s, time/meta_step_s and memory/peak_mb scalars from TensorBoard
#   6. scripts/train.py on 2D navigation with --num-steps 3, 4 meta-iterations each for
#      maml, binom L = 1, binom L = 2 and binom L = 1 with exact Fisher products
#      (--fvp-estimator maml): the same scalars (the K = 3 comparison of
#      docs/results/2dnav_k3_summary.md)
# Files in $OUT: gpu_check.log (everything), summary.md, benchmark_metastep.md,
# benchmark_metagrad.md.
# Without CUDA the GPU steps are skipped; GPU_CHECK_DEVICE=cpu runs them on the CPU at
# tiny sizes instead (to test this script); PYTHON picks the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
LOG=$OUT/gpu_check.log
SUMMARY=$OUT/summary.md
export PYTHONUNBUFFERED=1
: > "$LOG"
echo "# GPU check summary" > "$SUMMARY"
T0=$(date +%s)

log() { echo "$@" | tee -a "$LOG"; }
status() { echo "- $*" | tee -a "$SUMMARY" >> "$LOG"; }
# step NAME SECONDS CMD...: run under timeout, output into the log, status into the summary
step() {
    local name=$1 limit=$2
    shift 2
    log ""
    log "=== $name (limit ${limit}s) $(date +%T)"
    local t=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    local dt=$(($(date +%s) - t))
    case $rc in
        0) status "$name: ok (${dt}s)" ;;
        124 | 137) status "$name: TIMED OUT after ${dt}s" ;;
        *) status "$name: FAILED rc=$rc (${dt}s)" ;;
    esac
    return 0
}

# ---------------------------------------------------------------- 1. environment
log "=== environment"
(nvidia-smi || echo "nvidia-smi: not available") 2>&1 | tee -a "$LOG"

# Python packages: wheels from .whl/ only where gymnasium or mujoco is missing.
if ! "$PY" -c "import gymnasium, mujoco" >/dev/null 2>&1; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        log "installing .whl/*.whl into /tmp/site (offline)"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site \
            .whl/*.whl 2>&1 | grep -v "Running pip as" | tee -a "$LOG"
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
        log "WARNING: gymnasium/mujoco missing and no .whl/ (run scripts/fetch_gpu_wheels.sh)"
    fi
fi
# The package without installing it: envs/ and agents/ linked into binom_rl/ inside the
# checkout (what setup.cfg's package_dir does). A separate folder of links on PYTHONPATH is
# not enough: the checkout's own binom_rl/ shadows it in pytest and in sampler worker
# processes.
if ! "$PY" -c "import binom_rl.agents, binom_rl.envs" >/dev/null 2>&1; then
    ln -sfn ../envs "$REPO/binom_rl/envs"
    ln -sfn ../agents "$REPO/binom_rl/agents"
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$REPO

"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(0))
for name in ("gymnasium", "mujoco", "stable_baselines3", "tensorboard", "yaml", "binom_rl.agents"):
    try:
        mod = __import__(name, fromlist=["_"])
        print(f"{name} {getattr(mod, '__version__', '')} from {mod.__file__}")
    except Exception as err:
        print(f"{name}: NOT IMPORTABLE ({err})")
EOF

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    DEVICE=${GPU_CHECK_DEVICE:-cuda}
else
    DEVICE=${GPU_CHECK_DEVICE:-none}
fi
status "device for the GPU steps: $DEVICE"

# ---------------------------------------------------------------- settings
# GPU_CHECK_DEADLINE: seconds after the start by which everything must be over (default 500).
DEADLINE=$((T0 + ${GPU_CHECK_DEADLINE:-500}))
if [ "$DEVICE" = cpu ]; then
    SMALL_METASTEP=(--quick --ks 1 2 --chunk-k 2 --chunk-sizes none 4 --time-budget 30)
    SMALL_TRAIN=(--meta-batch-size 2 --fast-batch-size 2 --max-episode-steps 20)
    E2E_WORKERS=(2)
    TRAIN_BATCHES=1
else
    SMALL_METASTEP=(--time-budget 120)
    SMALL_TRAIN=()
    E2E_WORKERS=(16 1)
    TRAIN_BATCHES=3
fi

# scalars RUN LABEL: the run's per-iteration time / memory / return scalars as a table.
scalars() {
"$PY" - "$1" "$2" <<'EOF' 2>&1 | tee -a "$LOG" >> "$SUMMARY"
import sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1])
acc.Reload()
tags = ["time/sampling_s", "time/meta_step_s", "memory/peak_mb", "returns/step_0", "train/kl"]
print(f"\n{sys.argv[2]}:\n\n| iteration | " + " | ".join(tags) + " |")
print("|---" * (len(tags) + 1) + "|")
scalars = {t: {e.step: e.value for e in acc.Scalars(t)} for t in tags if t in acc.Tags()["scalars"]}
steps = sorted({s for v in scalars.values() for s in v})
for s in steps:
    print(f"| {s} | " + " | ".join(f"{scalars.get(t, {}).get(s, float('nan')):.4g}" for t in tags) + " |")
if not steps:
    print("(no TensorBoard scalars found)")
EOF
}

if [ "$DEVICE" != none ]; then
# ---------------------------------------------------------------- 2. end-to-end training
# First, while all 16 cores are free: the sampler's workers need them.
RUN=/tmp/gpu_check_run
if [ -f configs/half-cheetah-dir.yaml ]; then
    TRAIN_CFG=(--config configs/half-cheetah-dir.yaml)
else
    TRAIN_CFG=(--env-name binom_rl/HalfCheetahDir-v0 --max-episode-steps 200)
fi
# Twice: worker processes (--num-workers 16), then one in-process batch env whose
# mujoco.rollout thread pool uses every core (--num-workers 1), to compare the two.
for WORKERS in "${E2E_WORKERS[@]}"; do
rm -rf "$RUN"
step "train HalfCheetahDir ($DEVICE, $TRAIN_BATCHES it, $WORKERS workers)" 110 "$PY" scripts/train.py \
    "${TRAIN_CFG[@]}" --device "$DEVICE" "${SMALL_TRAIN[@]}" --num-workers "$WORKERS" --num-batches "$TRAIN_BATCHES" \
    --output-folder "$RUN" --no-progress
scalars "$RUN" "$WORKERS workers"
done

fi

# Optional CPU job on cores 4-15 while the GPU steps run pinned to cores 0-3 (they are
# launch-bound, so they get cores of their own): GPU_CHECK_BACKGROUND is a shell command,
# its output goes to $OUT/background.log; it is stopped at the deadline, then
# GPU_CHECK_AFTER (e.g. packing its results into $OUT) runs.
BG=""
PIN=()
if [ -n "${GPU_CHECK_BACKGROUND:-}" ] && [ "$(nproc)" -ge 8 ]; then
    setsid bash -c "taskset -c 4-$(($(nproc) - 1)) bash -c \"$GPU_CHECK_BACKGROUND\"" \
        > "$OUT/background.log" 2>&1 &
    BG=$!
    PIN=(taskset -c 0-3)
    status "background job started (pid $BG) on cores 4-$(($(nproc) - 1))"
fi

# ---------------------------------------------------------------- 3. tests
step "pytest CUDA + metagrad" 110 "${PIN[@]}" "$PY" -m pytest -q -p no:cacheprovider -rs \
    tests/binom_rl/test_cuda.py tests/binom_rl/test_metagrad.py tests/binom_rl/test_chunk_size.py
grep -E "^[0-9]+ (passed|failed)|passed|failed" "$LOG" | tail -1 | sed 's/^/  pytest: /' >> "$SUMMARY"

if [ "$DEVICE" = none ]; then
    status "no CUDA device: benchmarks and the training run skipped"
    log "total $(($(date +%s) - T0)) s"
    exit 0
fi

# ---------------------------------------------------------------- 4. meta-step benchmark
step "benchmark_metastep ($DEVICE)" 180 "${PIN[@]}" "$PY" scripts/benchmark_metastep.py --device "$DEVICE" \
    "${SMALL_METASTEP[@]}" --output "$OUT/benchmark_metastep.md"

# ---------------------------------------------------------------- 5. metagrad benchmark
step "benchmark_metagrad ($DEVICE)" 60 "${PIN[@]}" "$PY" scripts/benchmark_metagrad.py --device "$DEVICE" \
    --quick --tables cost flatness --output-dir /tmp/metagrad_bench
cp /tmp/metagrad_bench/benchmark_metagrad.md "$OUT/benchmark_metagrad.md" 2>/dev/null || true

# ---------------------------------------------------------------- 6. K = 3 meta-step
# The K = 3 comparison on 2D navigation (default config, --num-steps 3): the
# meta-step's time and peak memory per estimator, 4 iterations each (the first includes
# CUDA warm-up).
for EST in "maml" "binom --order 1" "binom --order 2" "binom --order 1 --fvp-estimator maml"; do
    rm -rf /tmp/gpu_check_k3
    step "2D navigation K=3, $EST ($DEVICE)" 90 "${PIN[@]}" "$PY" scripts/train.py \
        --config configs/2d-navigation.yaml --device "$DEVICE" "${SMALL_TRAIN[@]}" --num-steps 3 \
        --num-batches "$((TRAIN_BATCHES + 1))" --estimator $EST --output-folder /tmp/gpu_check_k3 \
        --no-progress
    scalars /tmp/gpu_check_k3 "2D navigation K=3, $EST"
done

if [ -n "$BG" ]; then
    while kill -0 "$BG" 2>/dev/null && [ "$(date +%s)" -lt "$DEADLINE" ]; do sleep 5; done
    if kill -0 "$BG" 2>/dev/null; then
        status "background job stopped at the deadline"
        kill -- -"$BG" 2>/dev/null; sleep 3; kill -9 -- -"$BG" 2>/dev/null
    else
        status "background job finished"
    fi
    [ -n "${GPU_CHECK_AFTER:-}" ] && bash -c "$GPU_CHECK_AFTER" 2>&1 | tee -a "$LOG"
fi

log ""
log "total $(($(date +%s) - T0)) s"
cat "$SUMMARY" >> "$LOG"
