#!/usr/bin/env bash
# The embedded VLA's training record as one command (docs/bench/policy.md): fresh-state expert
# demonstrations -> codec -> two VLA sizes -> one DAgger round each (their fresh-state closed-loop
# success is the validation that picks one; no benchmark state is used) -> retrain on everything ->
# the standard protocol (10 tasks x 50 benchmark initial states) on the final weights only.
#
#     RUN=runs/policy WORKERS=60 scripts/policy_pipeline.sh        # a many-core GPU node
#
# Every stage writes under $RUN and is skipped when its output exists, so a stopped run resumes.
# Knobs (environment): PY, RUN, WORKERS, TASKS, DEMO_INITS, DEMO_MIN, DAGGER_INITS, DAGGER_MIN, DAGGER_EVERY,
# STEPS0, MIN0, TRAIN_EXTRA, TRAIN_THREADS, STEPS1, MIN1, R1_INIT (init: fine-tune the picked round-0
# weights; scratch: train anew on all data), VAL_INITS, VAL_MIN (fresh starts that choose between
# round 0 and round 1; empty: round 1), EVAL_ROUND0 (non-empty: the protocol on round 0 too), EXECUTE (actions per policy query in DAgger and the
# evaluation; empty: the whole chunk), DEVICE, SIZE_A, SIZE_B, EVAL_ARGS. The defaults are the recorded
# run's (docs/bench/policy.md), which also set DEMO_MIN=6 MIN0=3.5 DAGGER_MIN=3 MIN1=2.5.
set -euo pipefail
PY=${PY:-python3}
RUN=${RUN:-runs/policy}
WORKERS=${WORKERS:-$(( $(nproc) - 4 ))}
TASKS=${TASKS:-0-9}
HALF=$(( WORKERS / 2 > 0 ? WORKERS / 2 : 1 ))
DEMO_INITS=${DEMO_INITS:-fresh:100-299}
DEMO_MIN=${DEMO_MIN:-7}
DAGGER_INITS=${DAGGER_INITS:-fresh:2000-2099}
DAGGER_MIN=${DAGGER_MIN:-3.5}
DAGGER_EVERY=${DAGGER_EVERY:-2}
STEPS0=${STEPS0:-8000}
MIN0=${MIN0:-4}
STEPS1=${STEPS1:-4000}
MIN1=${MIN1:-3}
DEVICE=${DEVICE:-cuda}
# A: the shipped architecture (5.2 M parameters); B: wider and deeper (about 11 M, under 25 MB in fp16).
SIZE_A=${SIZE_A:-}
SIZE_B=${SIZE_B:---hidden-size 320 --intermediate-size 960 --num-hidden-layers 6 --num-attention-heads 5 --vision-hidden-sizes 48 96 192}
EVAL_ARGS=${EVAL_ARGS:-}
TRAIN_THREADS=${TRAIN_THREADS:-2}
R1_INIT=${R1_INIT:-init}
EXECUTE=${EXECUTE:-}
VAL_INITS=${VAL_INITS:-}
VAL_MIN=${VAL_MIN:-3}
TRAIN_COMMON="--batch-size 256 --lr 5e-4 --warmup 200 --eval-interval 500 --free-running-samples 1024 --consistency-weight 4 --shift 4"

mkdir -p "$RUN"
log() { echo "$(date -u +%H:%M:%S) pipeline: $*" | tee -a "$RUN/pipeline.log"; }
gpu() { if [ "$DEVICE" = cuda ]; then echo "CUDA_VISIBLE_DEVICES=$1"; fi; }

if [ ! -f "$RUN/demos.done" ]; then
    log "demos: $DEMO_INITS, $WORKERS workers, at most $DEMO_MIN min"
    $PY -m producer.demos --out "$RUN/demos/spatial.hdf5" --tasks "$TASKS" --init-states "$DEMO_INITS" \
        --workers "$WORKERS" --shard-episodes 20 --max-minutes "$DEMO_MIN" --resume 2>>"$RUN/demos.err" \
        | tee "$RUN/demos.log" || true
    touch "$RUN/demos.done"
fi
DEMOS=$(ls "$RUN"/demos/spatial-*.hdf5)
log "demos: $(echo $DEMOS | wc -w) files"

if [ ! -f "$RUN/codec/codec.safetensors" ]; then
    log "codec"
    $PY -m trainer.train_codec --demos $DEMOS --out-dir "$RUN/codec" --threads 8 > "$RUN/codec.log" 2>&1
fi

train() {  # name gpu init-from steps minutes size-args data...
    local name=$1 g=$2 init=$3 steps=$4 minutes=$5 size=$6; shift 6
    if [ -f "$RUN/$name/model.safetensors" ]; then return; fi
    log "train $name ($steps steps, at most $minutes min)"
    env $(gpu "$g") $PY -m trainer.train_vla --demos "$@" --codec-dir "$RUN/codec" --out-dir "$RUN/$name" \
        --device "$DEVICE" --threads "$TRAIN_THREADS" --steps "$steps" --max-minutes "$minutes" $TRAIN_COMMON ${TRAIN_EXTRA:-} $init $size \
        > "$RUN/$name.log" 2>&1
}
train vla_a0 0 "" "$STEPS0" "$MIN0" "$SIZE_A" $DEMOS & pa=$!
train vla_b0 1 "" "$STEPS0" "$MIN0" "$SIZE_B" $DEMOS & pb=$!
wait $pa; wait $pb

dagger() {  # name weights
    if [ -f "$RUN/$1.hdf5" ]; then return; fi
    log "dagger $1 with $2 ($HALF workers, at most $DAGGER_MIN min)"
    $PY -m producer.dagger --weights-dir "$RUN/$2" --codec-dir "$RUN/codec" --round 1 --tasks "$TASKS" --init-states "$DAGGER_INITS" \
        --label-every "$DAGGER_EVERY" ${EXECUTE:+--replan $EXECUTE} --workers "$HALF" --max-minutes "$DAGGER_MIN" --out "$RUN/$1.hdf5" \
        > "$RUN/$1.log" 2>&1
}
dagger dagger_a1 vla_a0 & pa=$!
dagger dagger_b1 vla_b0 & pb=$!
wait $pa; wait $pb

# Validation: the policies' own success on the fresh DAgger starts (never a benchmark state).
PICK=$($PY - "$RUN" <<'EOF'
import json, sys
run = sys.argv[1]
rate = {}
for m in ("a", "b"):
    k, n = json.load(open(f"{run}/dagger_{m}1.json"))["policy_success"]["overall"]
    rate[m] = (k / max(n, 1), n)
pick = max(rate, key=lambda m: rate[m][0])
json.dump({"fresh_state_success": rate, "picked": pick}, open(f"{run}/pick.json", "w"), indent=1)
print(pick)
EOF
)
log "picked size $PICK (validation on fresh starts: $(cat "$RUN/pick.json" | tr -d '\n ')"
if [ "$R1_INIT" = init ]; then R1_FROM="--init-from $RUN/vla_${PICK}0"; R1_SIZE=""; else R1_FROM=""; SIZE_VAR="SIZE_${PICK^^}"; R1_SIZE="${!SIZE_VAR}"; fi
train "vla_${PICK}1" 0 "$R1_FROM" "$STEPS1" "$MIN1" "$R1_SIZE" \
    $DEMOS "$RUN/dagger_a1.hdf5" "$RUN/dagger_b1.hdf5"

# Round 0 or round 1? Both roll out from the same new fresh starts (VAL_INITS; the recorder labels only
# the first state, so this is a plain closed-loop run), compared on the episodes both finished. Round 1
# unless it is worse. VAL_INITS empty: round 1 without a check (the recorded run).
if [ -n "$VAL_INITS" ] && [ ! -f "$RUN/final_pick.json" ]; then
    validate() {  # name weights
        $PY -m producer.dagger --weights-dir "$RUN/$2" --codec-dir "$RUN/codec" --round 0 --tasks "$TASKS" \
            --init-states "$VAL_INITS" --label-every 100000 ${EXECUTE:+--replan $EXECUTE} --workers "$HALF" \
            --max-minutes "$VAL_MIN" --out "$RUN/$1.hdf5" > "$RUN/$1.log" 2>&1
    }
    log "validation of rounds 0 and 1 on $VAL_INITS"
    validate val_r0 "vla_${PICK}0" & pa=$!
    validate val_r1 "vla_${PICK}1" & pb=$!
    wait $pa; wait $pb
    $PY - "$RUN" "$PICK" <<'EOF'
import json, sys
run, pick = sys.argv[1], sys.argv[2]
eps = {r: {(e["task_id"], e["init_state"]): e["success"] for e in json.load(open(f"{run}/val_{r}.json"))["episodes"]}
       for r in ("r0", "r1")}
common = sorted(set(eps["r0"]) & set(eps["r1"]))
k = {r: sum(eps[r][c] for c in common) for r in eps}
final = f"vla_{pick}0" if k["r0"] > k["r1"] else f"vla_{pick}1"
json.dump({"paired_episodes": len(common), "successes": k, "final": final}, open(f"{run}/final_pick.json", "w"), indent=1)
print(f"validation on {len(common)} paired fresh episodes: round 0 {k['r0']}, round 1 {k['r1']} -> {final}")
EOF
fi
FINAL=$( [ -f "$RUN/final_pick.json" ] && $PY -c "import json,sys; print(json.load(open(sys.argv[1]))['final'])" "$RUN/final_pick.json" || echo "vla_${PICK}1")
ln -sfn "$FINAL" "$RUN/final"
log "final weights: $FINAL"

# The training data's record: every demonstration's start, and the leak check against the 50 benchmark
# initial states of every task (the same check the readers ran; here kept as a file).
if [ ! -f "$RUN/training_data.json" ]; then
    $PY - "$RUN" $DEMOS "$RUN/dagger_a1.hdf5" "$RUN/dagger_b1.hdf5" <<'EOF'
import json, sys
from pathlib import Path
from common.init_states import check_demo_files
run, files = sys.argv[1], [Path(f) for f in sys.argv[2:]]
report = check_demo_files(files)
report["files"] = [f.name for f in files]
json.dump(report, open(f"{run}/training_data.json", "w"), indent=1, default=str)
print(f"training data: {len(report['sources'])} episodes, leak check {report['check']}, "
      f"nearest fresh-to-benchmark distance {report.get('min_distance_m')}")
EOF
fi

if [ ! -f "$RUN/eval_final.json" ]; then
    log "standard protocol on $RUN/final ($WORKERS workers)"
    $PY -m evaluator.rollout --weights-dir "$RUN/final" --codec-dir "$RUN/codec" --workers "$WORKERS" \
        --out "$RUN/eval_final.json" --no-progress ${EXECUTE:+--execute $EXECUTE} $EVAL_ARGS > "$RUN/eval_final.log" 2>&1
fi
# Optional, reported and never used to choose: the same protocol on the round-0 weights (does a policy
# trained on fresh starts do as well on the benchmark states as on fresh ones?).
if [ -n "${EVAL_ROUND0:-}" ] && [ ! -f "$RUN/eval_round0.json" ]; then
    log "standard protocol on $RUN/vla_${PICK}0 (report only)"
    $PY -m evaluator.rollout --weights-dir "$RUN/vla_${PICK}0" --codec-dir "$RUN/codec" --workers "$WORKERS" \
        --out "$RUN/eval_round0.json" --no-progress ${EXECUTE:+--execute $EXECUTE} $EVAL_ARGS > "$RUN/eval_round0.log" 2>&1
fi
log "done"
