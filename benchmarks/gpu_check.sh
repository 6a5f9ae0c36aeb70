#!/usr/bin/env bash
# One command for a GPU machine (one H100/H200, < 8 minutes): the figures benchmarks/README.md
# asks for, measured in one run, then summarised.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine
#   SMOKE=1 bash benchmarks/gpu_check.sh    # the same commands, tiny shapes, on CPU (a dry run)
#
# Prints: MFU (against a bf16 matmul measured in the same run, and against the chip's peak)
# for the 1B and 8B shapes at A = 1, 16, 64 adapters in bf16; adapters/hour of the one job vs
# the PyTorch + PEFT loop on CUDA at batch 8; the batched-eval ratio vs transformers + PEFT;
# peak memory per adapter; the attention kernels checked against the reference on the GPU; and
# many-adapter decoding per row vs grouped.
# Every command has its own time limit, so one slow step cannot eat the whole budget.
# Checked against the defaults of 2026-12-07 (model.remat and scan_layers `auto`: a job scans on
# a GPU, and recomputes blocks only where it would not fit; bench_sweep sets both itself, as
# below; the chunked loss always, mesh fsdp 1 on one device, platform paths from the mesh's
# devices): the SMOKE run passes every step on a 2-core CPU (7.8 min under load, 2026-12-06).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
LOG=${LOG:-$(mktemp -d)/gpu_check}
mkdir -p "$(dirname "$LOG")"
: > "$LOG.jsonl"

if [ "${SMOKE:-0}" = 1 ]; then
  export JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES=
  M1=tiny-llama M8=small-llama ADAPTERS="1 2" PEFT_A=2 STEPS=1 QUESTIONS=4 LIMIT=300
  DTYPE=float32 EVAL_A=2 SCAN_A=2
else
  M1=llama-3.2-1b-shape M8=llama-3.1-8b-shape ADAPTERS="1 16 64" PEFT_A=16 STEPS=3
  QUESTIONS=16 LIMIT=150 DTYPE=bfloat16 EVAL_A=16 SCAN_A=16
fi
echo "gpu_check: logs in $LOG.*  (SMOKE=${SMOKE:-0})"
$PY - <<'PY'
import jax
print("devices:", jax.devices())
PY

step() {  # step NAME LIMIT_S COMMAND...: run, keep its JSON lines, report failure, go on
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$LOG.$name.out" 2>&1
  local rc=$?
  grep '^JSON ' "$LOG.$name.out" | sed "s/^JSON /{\"step\": \"$name\", \"data\": /; s/\$/}/" >> "$LOG.jsonl"
  echo "  [$name] rc=$rc in $((SECONDS - t0)) s"
  [ $rc -ne 0 ] && tail -5 "$LOG.$name.out"
  return 0
}

# 1. MFU of the one job: 1B and 8B shapes, bf16, A = 1, 16, 64 (no PEFT here: see 2; no
#    one-adapter jobs). The 8B shape scans its layers: one compiled block per A, not 32.
step mfu_1b $((LIMIT * 2)) $PY -m benchmarks.bench_sweep --model "$M1" --dtype "$DTYPE" \
  --adapters $ADAPTERS --steps "$STEPS" --no-single
step mfu_8b $((LIMIT * 2)) $PY -m benchmarks.bench_sweep --model "$M8" --dtype "$DTYPE" \
  --remat block --adapters $ADAPTERS --steps "$STEPS" --no-single --scan-layers
#    What scanning costs per step on this device: the 1B shape scanned at A = 16, against its
#    unrolled row of mfu_1b (`model.scan_layers: auto` scans on a GPU; this prices that).
step scan_1b "$LIMIT" $PY -m benchmarks.bench_sweep --model "$M1" --dtype "$DTYPE" \
  --adapters "$SCAN_A" --steps "$STEPS" --no-single --scan-layers
# 2. Adapters/hour vs PyTorch + PEFT on CUDA at the study's batch 8 (1B: PEFT reloads the base
#    per adapter, which an 8B model makes too slow for this budget).
step peft_1b "$LIMIT" $PY -m benchmarks.bench_sweep --model "$M1" --dtype "$DTYPE" \
  --adapters "$PEFT_A" --batch 8 --steps "$STEPS" --peft
# 3. Batched evaluation vs transformers + PEFT one question at a time.
step eval_1b "$LIMIT" $PY -m benchmarks.bench_eval --model "$M1" --adapters "$EVAL_A" \
  --questions "$QUESTIONS" --transformers
# 4. The attention kernels against the reference on this device (cuDNN included on a GPU).
step attention "$LIMIT" $PY -m pytest -q -x tests/test_attention.py
# 5. A pass of 64 rows over many adapters, per-row gather vs grouped (ragged_dot), at U = 64,
#    16 and 1 distinct adapters: what Engine(grouped=None) should pick on a GPU (unmeasured).
step grouped "$LIMIT" $PY -m benchmarks.bench_grouped --model "$M1" --adapters 65 --rows 64 \
  --rank 16 --width 64 --new-tokens 32

$PY - "$LOG.jsonl" <<'PY'
"""Summary: MFU per shape and A (vs the measured matmul and vs the chip's peak), adapters/hour
vs PEFT, peak memory per adapter, scanned vs unrolled seconds per step, the batched-eval
ratio."""
import json
import sys

PEAK = {"H100": 989e12, "H200": 989e12}  # dense bf16 FLOP/s (SXM)
print("\n== gpu_check summary ==")
results = [json.loads(line) for line in open(sys.argv[1])]
if not results:
    print("no results (see the logs)")
per_step = {}  # (model, A, scanned) -> one job's seconds per step, from its first run
for r in results:
    step, d = r["step"], r["data"]
    peak = next((v for k, v in PEAK.items() if k in json.dumps(d)), None)
    if "rows" in d:  # bench_sweep
        ceiling = float(d["matmul_flops_per_s"])
        mem = {}
        for row in d["rows"]:
            A = row["adapters"]
            scan = bool(d.get("scan_layers"))
            per_step.setdefault((d["model"], A, scan), row["one_job_s_per_step"])
            line = f"[{step}] {d['model']} {d['dtype']}{' scanned' if scan else ''} A={A}: "
            line += f"MFU {row['one_job_mfu']:.1%} of matmul"
            if peak:
                line += f", {row['one_job_mfu'] * ceiling / peak:.1%} of chip peak"
            line += f", {row['one_job_adapters_per_hour']} adapters/h"
            if "one_job_vs_peft" in row:
                line += f", {row['one_job_vs_peft']}x PEFT"
            if "one_job_peak_memory_gib" in row:
                mem[A] = row["one_job_peak_memory_gib"]
                line += f", peak {mem[A]} GiB"
            print(line)
        if len(mem) > 1:
            lo, hi = min(mem), max(mem)
            print(f"[{step}] peak memory per adapter: {(mem[hi] - mem[lo]) / (hi - lo):.3f} GiB")
    else:  # bench_eval
        keep = {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        print(f"[{step}] " + ", ".join(f"{k}={v}" for k, v in keep.items()))
for (model, A, scan), seconds in per_step.items():
    if scan and (model, A, False) in per_step:
        unrolled = per_step[model, A, False]
        print(f"[scan] {model} A={A}: scanned {seconds} s/step vs unrolled {unrolled}: "
              f"{seconds / unrolled:.2f}x")
PY
