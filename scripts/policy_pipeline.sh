#!/usr/bin/env bash
# The embedded VLA's training record as one command (docs/bench/policy.md): fresh-state expert
# demonstrations -> codec -> two VLA sizes -> one DAgger round each (their fresh-state closed-loop
# success is the validation that picks one; no benchmark state is used) -> retrain on everything ->
# further DAgger rounds with the picked size (ROUNDS) -> the rounds compared on new fresh starts ->
# the standard protocol (10 tasks x 50 benchmark initial states) on the final weights only, and the draft
# of the final policy beside it -> optionally the paired RSD arms under the same protocol.
#
#     RUN=runs/policy WORKERS=60 scripts/policy_pipeline.sh        # a many-core GPU node
#
# Every stage writes under $RUN and is skipped when its output exists, so a stopped run resumes.
# Knobs (environment): PY, RUN, WORKERS, TASKS, DEMO_INITS, DEMO_MIN, DEMO_ARGS (e.g. "--action-noise 0.3"),
# DAGGER_INITS, DAGGER_MIN, DAGGER_EVERY,
# PICK_INITS, PICK_MIN (with ROUNDS=0: the fresh starts and time cap of the rollouts that pick the size),
# STEPS0, MIN0, TRAIN_EXTRA, TRAIN_THREADS, ROUNDS (DAgger rounds; 0: none, round 0 is final and the first
# rollouts only pick the size; round r > 1 rolls out round r-1's policy on new fresh starts with all
# workers), STEPS1, MIN1 (each round's training), R1_INIT (init: fine-tune the previous round's
# weights; scratch: train anew on all data), VAL_INITS, VAL_MIN (fresh starts
# that choose between the rounds; empty: the last round), EVAL (0: stop before the standard protocol),
# EVAL_ROUND0 (non-empty: the protocol on round 0 too), EXECUTE (actions per policy query in DAgger and the
# evaluation; empty: the whole chunk), DEVICE, SIZE_A, SIZE_B, CODEC_ARGS, EVAL_ARGS, DRAFT (0: no draft of the
# final policy), DRAFT_GPU, DRAFT_ARGS, ARMS (closed-loop arms of evaluator.eval under the standard protocol,
# e.g. "baseline relaxed truncate-k2"; empty: none), ARMS_ARGS, CANDIDATES_ONLY (1: stop after round 0 with both
# sizes ready, each with its decoded depth written and its own draft, draft_a.pt and draft_b.pt; the size pick
# and everything after it then run where the run folder is brought back, by this script again with, e.g.,
# DEVICE=cpu WORKERS=2: a lent node's time goes to demonstrations and training). The defaults are the recorded
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
PICK_INITS=${PICK_INITS:-fresh:2000-2004}
PICK_MIN=${PICK_MIN:-4}
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
ROUNDS=${ROUNDS:-1}
EVAL=${EVAL:-1}
DRAFT=${DRAFT:-1}
DRAFT_GPU=${DRAFT_GPU:-2}
DRAFT_ARGS=${DRAFT_ARGS:---batch-size 512 --epochs 20 --extract-batch 512}
ARMS=${ARMS:-}
ARMS_ARGS=${ARMS_ARGS:-}
EXECUTE=${EXECUTE:-}
VAL_INITS=${VAL_INITS:-}
VAL_MIN=${VAL_MIN:-3}
TRAIN_COMMON="--batch-size 256 --lr 5e-4 --warmup 200 --eval-interval 500 --free-running-samples 1024 --consistency-weight 4 --shift 4"

mkdir -p "$RUN"
log() { echo "$(date -u +%H:%M:%S) pipeline: $*" | tee -a "$RUN/pipeline.log"; }
trap 'log "stopped: a stage failed (line $LINENO, exit $?); its log is under $RUN"' ERR
gpu() { if [ "$DEVICE" = cuda ]; then echo "CUDA_VISIBLE_DEVICES=$1"; fi; }

if [ ! -f "$RUN/demos.done" ]; then
    log "demos: $DEMO_INITS, $WORKERS workers, at most $DEMO_MIN min"
    $PY -m producer.demos --out "$RUN/demos/spatial.hdf5" --tasks "$TASKS" --init-states "$DEMO_INITS" \
        --workers "$WORKERS" --shard-episodes 20 --max-minutes "$DEMO_MIN" --resume ${DEMO_ARGS:-} 2>>"$RUN/demos.err" \
        | tee "$RUN/demos.log" || true
    touch "$RUN/demos.done"
fi
# Resumed on another machine (CANDIDATES_ONLY above), the demonstrations are not there: the stages that
# read them (codec, training, drafts, the data record) are done already.
DEMOS=$(ls "$RUN"/demos/spatial-*.hdf5 2>/dev/null || true)
log "demos: $(echo $DEMOS | wc -w) files"

if [ ! -f "$RUN/codec/codec.safetensors" ]; then
    log "codec"
    $PY -m trainer.train_codec --demos $DEMOS --out-dir "$RUN/codec" --threads 8 ${CODEC_ARGS:-} > "$RUN/codec.log" 2>&1
fi

# The training data's record: every demonstration's start, and the leak check against the 50 benchmark
# initial states of every task (the same check the readers ran; here kept as a file).
data_record() {
    if [ -f "$RUN/training_data.json" ]; then return; fi
    $PY - "$RUN" $DEMOS ${DAGGER_FILES:-} <<'EOF'
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
}

# The decoded depth (the informative layers, common/layer_info.py) written into a weights folder's config.
write_depth() { $PY -m common.layer_info --weights-dir "$1" --codec-dir "$RUN/codec" --write | tail -1 | tee -a "$RUN/pipeline.log"; }
# A draft fitted on a policy's own hidden states and codes over the given training files.
fit_draft() {  # gpu weights-dir out log data...
    local g=$1 weights=$2 out=$3 logf=$4; shift 4
    env $(gpu "$g") $PY -m trainer.fit_draft --demos "$@" --weights-dir "$weights" --codec-dir "$RUN/codec" \
        --device "$DEVICE" --threads 4 --slim --out "$out" $DRAFT_ARGS > "$logf" 2>&1
}

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

if [ "${CANDIDATES_ONLY:-0}" = 1 ]; then
    data_record
    pids=""
    for m in a b; do
        write_depth "$RUN/vla_${m}0"
        if [ "$DRAFT" = 1 ] && [ ! -f "$RUN/draft_$m.pt" ]; then
            log "draft of vla_${m}0"
            g=0; [ "$m" = b ] && g=1
            fit_draft "$g" "$RUN/vla_${m}0" "$RUN/draft_$m.pt" "$RUN/draft_$m.log" $DEMOS & pids="$pids $!"
        fi
    done
    for p in $pids; do wait "$p"; done
    log "candidates ready: vla_a0 and vla_b0 with draft_a.pt and draft_b.pt (the pick runs where this run is resumed)"
    log "done"
    exit 0
fi

# Closed-loop rollouts of a policy (producer.dagger): with expert labels on every LABEL_EVERY-th state (a DAgger
# round), or on the first state only (LABEL_EVERY 100000: a plain closed-loop run, the validation).
rollouts() {  # name weights round init-states label-every minutes workers
    if [ -f "$RUN/$1.hdf5" ]; then return; fi
    log "rollouts $1 with $2 (round $3, $4, label every $5, $7 workers, at most $6 min)"
    $PY -m producer.dagger --weights-dir "$RUN/$2" --codec-dir "$RUN/codec" --round "$3" --tasks "$TASKS" --init-states "$4" \
        --label-every "$5" ${EXECUTE:+--replan $EXECUTE} --workers "$7" --max-minutes "$6" --out "$RUN/$1.hdf5" \
        > "$RUN/$1.log" 2>&1
}
# Round r's DAgger starts: DAGGER_INITS moved on by (r - 1) times its length, so no start repeats across rounds.
dagger_inits() {
    local lo hi n; lo=${DAGGER_INITS#fresh:}; hi=${lo#*-}; lo=${lo%-*}; n=$(( hi - lo + 1 ))
    echo "fresh:$(( lo + ($1 - 1) * n ))-$(( hi + ($1 - 1) * n ))"
}
# The size pick. ROUNDS >= 1: each size's first DAgger round (labelled rollouts on DAGGER_INITS, at most DAGGER_MIN
# minutes). ROUNDS=0: plain rollouts of each size on the same fixed fresh starts PICK_INITS, no labels, so they
# finish (labelling every other state made run 3's two-minute rollouts finish 5 and 3 episodes).
if [ "$ROUNDS" -ge 1 ]; then
    PICK_A=dagger_a1; PICK_B=dagger_b1
    rollouts dagger_a1 vla_a0 1 "$(dagger_inits 1)" "$DAGGER_EVERY" "$DAGGER_MIN" "$HALF" & pa=$!
    rollouts dagger_b1 vla_b0 1 "$(dagger_inits 1)" "$DAGGER_EVERY" "$DAGGER_MIN" "$HALF" & pb=$!
    DAGGER_FILES="$RUN/dagger_a1.hdf5 $RUN/dagger_b1.hdf5"
else
    PICK_A=pick_a; PICK_B=pick_b
    rollouts pick_a vla_a0 0 "$PICK_INITS" 100000 "$PICK_MIN" "$HALF" & pa=$!
    rollouts pick_b vla_b0 0 "$PICK_INITS" 100000 "$PICK_MIN" "$HALF" & pb=$!
    DAGGER_FILES=""
fi
wait $pa; wait $pb

# Validation: the sizes' success on the fresh starts both finished (never a benchmark state); a tie goes to B.
PICK=$($PY - "$RUN" "$PICK_A" "$PICK_B" <<'EOF'
import json, sys
run, files = sys.argv[1], dict(zip("ab", sys.argv[2:]))
eps = {m: {(e["task_id"], e["init_state"]): e["success"] for e in json.load(open(f"{run}/{f}.json"))["episodes"]}
       for m, f in files.items()}
common = sorted(set(eps["a"]) & set(eps["b"]))
k = {m: sum(eps[m][c] for c in common) for m in eps}
pick = "a" if k["a"] > k["b"] else "b"
rate = {m: (k[m] / max(len(common), 1), len(common)) for m in eps}
json.dump({"fresh_state_success": rate, "paired_episodes": len(common), "files": files, "picked": pick},
          open(f"{run}/pick.json", "w"), indent=1)
print(pick)
EOF
)
log "picked size $PICK (validation on fresh starts: $(cat "$RUN/pick.json" | tr -d '\n ')"
SIZE_VAR="SIZE_${PICK^^}"
for r in $(seq 1 "$ROUNDS"); do
    if [ "$r" -gt 1 ]; then
        rollouts "dagger_$r" "vla_${PICK}$(( r - 1 ))" "$r" "$(dagger_inits "$r")" "$DAGGER_EVERY" "$DAGGER_MIN" "$WORKERS"
        DAGGER_FILES="$DAGGER_FILES $RUN/dagger_$r.hdf5"
    fi
    if [ "$R1_INIT" = init ]; then FROM="--init-from $RUN/vla_${PICK}$(( r - 1 ))"; SIZE=""; else FROM=""; SIZE="${!SIZE_VAR}"; fi
    train "vla_${PICK}$r" 0 "$FROM" "$STEPS1" "$MIN1" "$SIZE" $DEMOS $DAGGER_FILES
done

# Which round? Every round's policy rolls out from the same new fresh starts (VAL_INITS; the recorder labels
# only the first state, so this is a plain closed-loop run); the most successes on the episodes all of them
# finished wins, a tie goes to the later round. VAL_INITS empty: the last round, unchecked.
if [ -n "$VAL_INITS" ] && [ ! -f "$RUN/final_pick.json" ]; then
    log "validation of rounds 0..$ROUNDS on $VAL_INITS"
    share=$(( WORKERS / (ROUNDS + 1) > 0 ? WORKERS / (ROUNDS + 1) : 1 ))
    pids=""
    for r in $(seq 0 "$ROUNDS"); do
        rollouts "val_r$r" "vla_${PICK}$r" 0 "$VAL_INITS" 100000 "$VAL_MIN" "$share" & pids="$pids $!"
    done
    for p in $pids; do wait "$p"; done
    $PY - "$RUN" "$PICK" "$ROUNDS" <<'EOF'
import json, sys
run, pick, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
eps = {r: {(e["task_id"], e["init_state"]): e["success"] for e in json.load(open(f"{run}/val_r{r}.json"))["episodes"]}
       for r in range(rounds + 1)}
common = sorted(set.intersection(*(set(e) for e in eps.values())))
k = {r: sum(eps[r][c] for c in common) for r in eps}
best = max(eps, key=lambda r: (k[r], r))
final = f"vla_{pick}{best}"
json.dump({"paired_episodes": len(common), "successes": {f"round {r}": k[r] for r in k}, "final": final},
          open(f"{run}/final_pick.json", "w"), indent=1)
print(f"validation on {len(common)} paired fresh episodes: {k} -> {final}")
EOF
fi
FINAL=$( [ -f "$RUN/final_pick.json" ] && $PY -c "import json,sys; print(json.load(open(sys.argv[1]))['final'])" "$RUN/final_pick.json" || echo "vla_${PICK}${ROUNDS}")
ln -sfn "$FINAL" "$RUN/final"
log "final weights: $FINAL"
# The decoded depth (the informative layers, common/layer_info.py) is recorded in the final weights' config
# before anything evaluates them, so the protocol and the arms run the decoding that ships.
write_depth "$RUN/final"

# The draft of the final policy (for RSD, issue 17): fitted on the policy's own hidden states and codes
# over every training frame (demonstrations and DAgger states; no benchmark state), beside the protocol.
draft() {
    if [ "$DRAFT" != 1 ] || [ -f "$RUN/draft.pt" ]; then return; fi
    if [ -f "$RUN/draft_$PICK.pt" ] && [ "$FINAL" = "vla_${PICK}0" ]; then  # made with the candidates
        log "draft of $FINAL: draft_$PICK.pt"; ln -sfn "draft_$PICK.pt" "$RUN/draft.pt"; return
    fi
    log "draft of $FINAL"
    fit_draft "$DRAFT_GPU" "$RUN/final" "$RUN/draft.pt" "$RUN/draft.log" $DEMOS $DAGGER_FILES
}
draft & pdraft=$!
data_record

if [ "$EVAL" = 1 ] && [ ! -f "$RUN/eval_final.json" ]; then
    log "standard protocol on $RUN/final ($WORKERS workers)"
    $PY -m evaluator.rollout --weights-dir "$RUN/final" --codec-dir "$RUN/codec" --workers "$WORKERS" \
        --out "$RUN/eval_final.json" --no-progress ${EXECUTE:+--execute $EXECUTE} $EVAL_ARGS > "$RUN/eval_final.log" 2>&1
fi
# Optional, reported and never used to choose: the same protocol on the round-0 weights (does a policy
# trained on fresh starts do as well on the benchmark states as on fresh ones?).
if [ "$EVAL" = 1 ] && [ -n "${EVAL_ROUND0:-}" ] && [ ! -f "$RUN/eval_round0.json" ]; then
    log "standard protocol on $RUN/vla_${PICK}0 (report only)"
    $PY -m evaluator.rollout --weights-dir "$RUN/vla_${PICK}0" --codec-dir "$RUN/codec" --workers "$WORKERS" \
        --out "$RUN/eval_round0.json" --no-progress ${EXECUTE:+--execute $EXECUTE} $EVAL_ARGS > "$RUN/eval_round0.log" 2>&1
fi
wait $pdraft
# Paired closed-loop arms of RSD under the standard protocol (issue 17): ARMS, for example
# "baseline relaxed truncate-k2" (about 6.5 minutes per 500-episode arm on 60 workers).
if [ -n "$ARMS" ] && [ ! -f "$RUN/arms/eval.json" ]; then
    log "closed-loop arms: $ARMS ($WORKERS workers)"
    $PY -m evaluator.eval --draft "$RUN/draft.pt" --weights-dir "$RUN/final" --codec-dir "$RUN/codec" \
        --closed-loop-arms $ARMS --workers "$WORKERS" --out-dir "$RUN/arms" ${EXECUTE:+--execute $EXECUTE} $ARMS_ARGS \
        > "$RUN/arms.log" 2>&1
fi
log "done"
