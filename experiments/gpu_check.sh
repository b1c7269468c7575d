#!/usr/bin/env bash
# The README's GPU table in one call (sized to take under 8 minutes on one H200): the CLEVRTEX config with
# random weights on synthetic images (no dataset, no network), phase 1 at batch 128 and phases 2 and 3 at
# batch 64, in float32 and in bfloat16, and phase 3 in float32 with the Segformer's blocks scanned
# (`model.segformer_scan`), each with its cold compile time (an empty compilation cache), its warm one (a second
# process that finds the program in the cache) and that process's tracing time, steps/s, images/s and FLOPs
# per step.
#
#   experiments/gpu_check.sh [OUTDIR]          (from the repository root)
#
# Needs JAX with its GPU plugin, flax, optax, orbax-checkpoint, jaxtyping, absl-py and ml_collections; not
# TensorFlow, TFDS or CLU. Where ml_collections is missing, bring its wheel (pure Python:
# `pip download ml_collections==1.1.0 --no-deps -d WHEELS` on a machine with a network) and pass
# WHEELS=WHEELS: it is installed into OUTDIR/site, not into the environment.
#
# Stage 1 compiles the seven steps at once, one process each, into a fresh cache (the GPU memory split between
# them, no step run): their compile times are cold compiles on a machine that is compiling six programs.
# SEQUENTIAL=1 compiles them one after the other instead (a clean cold time each; longer). Stage 2 runs the seven
# measurements one after the other with that cache: their compile time is a warm start, and each has the GPU
# to itself. Results: OUTDIR/cold_*.json, OUTDIR/warm_*.json and the table OUTDIR/table.md (also printed).
set -euo pipefail

out=${1:-gpu_check_$(date +%Y%m%d_%H%M%S)}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cache="$out/compilation_cache"
rm -rf "$cache"
# The launchers' cache (ast_seg_jax.cli) goes to this run's own directory; JAX's variable would win over it.
unset JAX_COMPILATION_CACHE_DIR
export AST_SEG_COMPILATION_CACHE="$cache"
export TF_CPP_MIN_LOG_LEVEL=2

if [[ -n "${WHEELS:-}" ]]; then
  python -m pip install --quiet --no-index --no-deps --target "$out/site" "$WHEELS"/*.whl
  export PYTHONPATH="$out/site${PYTHONPATH:+:$PYTHONPATH}"
fi
python - <<'EOF'
import importlib.util
import sys

missing = [m for m in ("jax", "flax", "optax", "orbax.checkpoint", "jaxtyping", "absl", "ml_collections")
           if importlib.util.find_spec(m.split(".")[0]) is None]
if missing:
    sys.exit(f"gpu_check: missing Python packages: {', '.join(missing)} (see the header of this script).")
import jax
print(f"jax {jax.__version__}: {jax.devices()}", flush=True)
EOF

config=experiments/configs/clevrtex.py
# name, phase, batch size, compute dtype, Segformer blocks scanned
runs=(
  "p1_f32 1 128 float32 False"
  "p2_f32 2 64 float32 False"
  "p3_f32 3 64 float32 False"
  "p1_bf16 1 128 bfloat16 False"
  "p2_bf16 2 64 bfloat16 False"
  "p3_bf16 3 64 bfloat16 False"
  "p3_f32_scan 3 64 float32 True"
)

bench() {  # name phase batch dtype scan prefix [extra flags...]
  local name=$1 phase=$2 batch=$3 dtype=$4 scan=$5 prefix=$6
  shift 6
  python -m experiments.benchmark --config="$config" --phase="$phase" --batch_size="$batch" \
    --config.model.compute_dtype="$dtype" --config.model.segformer_scan="$scan" --init=random \
    --json="$out/${prefix}_${name}.json" "$@" > "$out/${prefix}_${name}.log" 2>&1
}

start=$(date +%s)
echo "stage 1: cold compiles into an empty cache ($(if [[ "${SEQUENTIAL:-0}" == 1 ]]; then echo one at a time; else echo seven at once; fi))"
pids=()
for run in "${runs[@]}"; do
  read -r name phase batch dtype scan <<<"$run"
  if [[ "${SEQUENTIAL:-0}" == 1 ]]; then
    bench "$name" "$phase" "$batch" "$dtype" "$scan" cold --compile_only
  else
    XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.13 \
      bench "$name" "$phase" "$batch" "$dtype" "$scan" cold --compile_only &
    pids+=($!)
  fi
done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
if [[ $failed == 1 ]]; then
  echo "gpu_check: a cold compile failed; see $out/cold_*.log" >&2
  exit 1
fi
echo "stage 1 took $(($(date +%s) - start)) s"

echo "stage 2: timed steps, warm cache, one at a time"
for run in "${runs[@]}"; do
  read -r name phase batch dtype scan <<<"$run"
  bench "$name" "$phase" "$batch" "$dtype" "$scan" warm --repeats=5 --warmup=2 --steps_per_repeat=5 \
    || { echo "gpu_check: $name failed; see $out/warm_$name.log" >&2; exit 1; }
  echo "  $name done ($(($(date +%s) - start)) s)"
done

python - "$out" <<'EOF'
import json
import os
import sys

out = sys.argv[1]
rows = ["| phase | batch | dtype | Segformer | steps/s | img/s | cold compile s | warm compile s | warm trace s "
        "| GFLOP/step | TFLOP/s | % of peak | GPU mem GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]


def fmt(value, scale=1.0, digits=3):
    return "n/a" if value is None else f"{value / scale:.{digits}g}"


for name in ("p1_f32", "p2_f32", "p3_f32", "p1_bf16", "p2_bf16", "p3_bf16", "p3_f32_scan"):
    with open(os.path.join(out, f"cold_{name}.json")) as f:
        cold = json.load(f)
    with open(os.path.join(out, f"warm_{name}.json")) as f:
        warm = json.load(f)
    rows.append(
        f"| {warm['phase']} | {warm['batch_size']} | {warm['compute_dtype']} "
        f"| {'scanned' if name.endswith('_scan') else 'unrolled'} | {fmt(warm['steps_per_second'])} "
        f"| {fmt(warm['images_per_second'])} | {fmt(cold['compile_seconds'])} | {fmt(warm['compile_seconds'])} "
        f"| {fmt(warm['lower_seconds'])} "
        f"| {fmt(warm['flops_per_step'], 1e9, 4)} | {fmt(warm['achieved_tflops'])} "
        f"| {fmt(warm['fraction_of_peak'], 0.01)} | {fmt(warm['peak_device_memory_bytes'], 1e9)} |"
    )
warm = json.load(open(os.path.join(out, "warm_p3_f32.json")))
head = (f"CLEVRTEX config, random weights, synthetic images; {warm['device_kind']} x{warm['num_devices']}, "
        f"jax {warm['jax_version']}, float32 matmul precision {warm['matmul_precision']}.")
table = head + "\n\n" + "\n".join(rows) + "\n"
with open(os.path.join(out, "table.md"), "w") as f:
    f.write(table)
print(table)
EOF
echo "gpu_check: $(($(date +%s) - start)) s in all; results in $out"
