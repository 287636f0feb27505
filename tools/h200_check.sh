#!/usr/bin/env bash
# One device run that measures each step switch against its old path, in priority order, each
# phase under its own timeout so a late failure keeps what came before (the benchmark rewrites its
# JSON after every finished run). Writes JSON and logs under $RESULTS (default docs/results) and
# prints one table at the end.
#   H200:     bash tools/h200_check.sh            (about 9.5 minutes: phases 280+160+75+60 s)
#   CPU dry:  DRY=1 RESULTS=/tmp/r bash tools/h200_check.sh   (the same phases on the tiny model,
#             eager, on the CPU; each setting below can still be overridden)
# rsperuse (one reduce-scatter per use instead of per unit) only matters with several GPUs:
# RS=1 adds it to the switches.
set -u
PY=${PY:-python3}
if [ "${DRY:-0}" = 1 ]; then
  : "${MODE:=eager}" "${DEVICE:=cpu}" "${BASE:=blip_pretrain_tiny}" "${LARGE:=blip_pretrain_tiny}"
  : "${BATCH_B:=8}" "${BATCH_L:=8}" "${STEPS:=2}" "${WARMUP:=1}" "${PHASE_S:=300}" "${WORKERS:=1}"
  : "${RS:=1}"
fi
DEVICE=${DEVICE:-cuda}
BASE=${BASE:-blip_pretrain_base}
LARGE=${LARGE:-blip_pretrain_large}
BATCH_B=${BATCH_B:-128}
BATCH_L=${BATCH_L:-96}
WARMUP=${WARMUP:-4}
STEPS=${STEPS:-12}
MODE=${MODE:-compile}  # eager for a CPU dry run (compiling on a CPU takes minutes)
# per-phase limits in seconds (PHASE_S sets all four)
SWITCHES_S=${SWITCHES_S:-${PHASE_S:-280}}
LARGE_S=${LARGE_S:-${PHASE_S:-160}}
SPLIT_S=${SPLIT_S:-${PHASE_S:-75}}
LOADER_S=${LOADER_S:-${PHASE_S:-60}}
RESULTS=${RESULTS:-docs/results}
mkdir -p "$RESULTS"
COMMON=(--device "$DEVICE" --warmup "$WARMUP" --steps "$STEPS")
if [ "$DEVICE" = cpu ]; then COMMON+=(--threads 1 --image-size 32); fi

phase() {  # name, timeout seconds, benchmark arguments...
  local name=$1 limit=$2; shift 2
  local start; start=$(date +%s)
  echo "== $name (limit ${limit}s)"
  timeout -k 10 "$limit" "$PY" tools/benchmark.py "${COMMON[@]}" "$@" \
    --json "$RESULTS/h200-$name.json" >"$RESULTS/h200-$name.log" 2>&1
  echo "   rc=$? in $(( $(date +%s) - start ))s ($RESULTS/h200-$name.log)"
}

# 1. ViT-B: the new step against each switch's old path, and the transformers baseline.
# (most telling first: a phase cut by its limit keeps the runs before)
SWITCHES=$MODE-bf16,$MODE-bf16-autocast,$MODE-bf16-kvrecompute,$MODE-bf16-lmfull
if [ "${RS:-0}" = 1 ]; then SWITCHES+=,$MODE-bf16-rsperuse; fi
SWITCHES+=,$MODE-bf16-unfused,$MODE-bf16-objeager
phase switches "$SWITCHES_S" --model "$BASE" --batch-size "$BATCH_B" --variants "$SWITCHES"
# 2. ViT-L: bf16 vs float8 (no baseline).
phase large "$LARGE_S" --model "$LARGE" --batch-size "$BATCH_L" --no-baseline \
  --variants $MODE-bf16,$MODE-bf16-float8-tensorwise
# 3. Time split of the new step.
phase split "$SPLIT_S" --model "$BASE" --batch-size "$BATCH_B" --no-baseline \
  --variants $MODE-bf16 --profile --profile-steps 2
# 4. Data wait with the real loader (synthetic source; photo-like shards: docs/performance.md).
phase loader "$LOADER_S" --model "$BASE" --batch-size "$BATCH_B" --no-baseline \
  --variants $MODE-bf16 --data loader --workers "${WORKERS:-14}"

"$PY" - "$RESULTS" <<'PYEOF'
import json, sys, pathlib
rows = []
for phase in ("switches", "large", "split", "loader"):
    path = pathlib.Path(sys.argv[1]) / f"h200-{phase}.json"
    if not path.exists():  # timed out or failed before writing: say so in the table
        rows.append((path.stem, None, None, None, None, f"no JSON (see {path.stem}.log)"))
        continue
    data = json.loads(path.read_text())
    for run in data.get("results", []):
        rows.append((path.stem, run.get("name"), run.get("samples_per_sec"), run.get("effective_mfu"),
                     run.get("data_wait_frac"), run.get("error")))
print("| phase | run | samples/s | eff. MFU | data wait | error |")
print("|---|---|---|---|---|---|")
for r in rows:
    print("| " + " | ".join("" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
                            for v in r) + " |")
PYEOF
