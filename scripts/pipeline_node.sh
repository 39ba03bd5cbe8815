#!/usr/bin/env bash
# Run scripts/policy_pipeline.sh on a leased node whose commands are cut off after a few minutes and whose
# files come back only in small pieces (docs/bench/policy.md): start it detached, wait for it in later
# calls, and pack what it made with tools.run_pack (the final weights, their codec and the draft are
# checked; the demonstrations stay on the node).
#
#     BUNDLE=.bundle RUN=runs/policy4 ROUNDS=0 … scripts/pipeline_node.sh start 540   # first call: start, wait 540 s
#     RUN=runs/policy4 OUT=$OUT scripts/pipeline_node.sh poll 540 weights            # until the weights and draft exist
#     RUN=runs/policy4 OUT=$OUT scripts/pipeline_node.sh poll 540                     # until the pipeline is done
#     RUN=runs/policy4 OUT=$OUT PARTS=0-3 scripts/pipeline_node.sh poll 540            # a pack over one call's limit:
#     RUN=runs/policy4 OUT=$OUT PARTS=4-9 scripts/pipeline_node.sh poll 5              # its parts over two calls
#
# start: sources scripts/libero_offline.sh $BUNDLE when BUNDLE is set, then starts the pipeline with the
# caller's environment (its knobs) under setsid, so it outlives the call, and polls like `poll`.
# poll SECONDS [weights]: waits at most SECONDS for the pipeline to finish (or, with `weights`, for the final
# weights and the draft), prints the log, and packs the run into $RUN/pack and copies it to $OUT when OUT is set
# (with PARTS=LO-HI only the manifest and those parts; a pack already made is then reused, so the parts of
# successive calls belong together).
# A lent machine that copies the working tree (limit 64 MiB) does not need the shipped weights to train:
# with the offline bundle (about 38 MB) beside the tracked files, move assets/embedded_vla/model.safetensors
# aside for the calls and back afterwards.
set -uo pipefail
cmd=${1:-}
seconds=${2:-540}
if [ "$cmd" != start ] && [ "$cmd" != poll ]; then
    sed -n '2,18p' "$0"
    [ "$cmd" = -h ] || [ "$cmd" = --help ] || exit 2
    exit 0
fi
RUN=${RUN:?set RUN, the pipeline run folder}
PY=${PY:-python3}

poll() {
    local t0; t0=$(date +%s)
    while [ $(( $(date +%s) - t0 )) -lt "$seconds" ]; do
        if grep -qE 'pipeline: (done|stopped)' "$RUN/pipeline.log" 2>/dev/null; then break; fi
        if [ "${1:-}" = weights ] && grep -q 'final weights' "$RUN/pipeline.log" 2>/dev/null \
            && { [ -f "$RUN/draft.pt" ] || [ "${DRAFT:-1}" != 1 ]; }; then break; fi
        sleep 10
    done
    date -u
    cat "$RUN/pipeline.log" 2>/dev/null
    for f in "$RUN"/*.log; do
        [ -f "$f" ] || continue
        echo "== $f"; tail -c 400 "$f" | tr '\r' '\n' | grep -v '^\s*$' | tail -2
    done
    if [ -n "${OUT:-}" ]; then
        if [ -z "${PARTS:-}" ] || [ ! -f "$RUN/pack/MANIFEST.json" ]; then
            rm -rf "$RUN/pack"
            $PY -m tools.run_pack pack --run "$RUN" --out "$RUN/pack" || echo "pipeline_node: the pack lacks required files (above)"
        fi
        cp "$RUN/pack/MANIFEST.json" "$OUT/"
        local lo=0 hi=999 i name
        if [ -n "${PARTS:-}" ]; then lo=${PARTS%-*}; hi=${PARTS#*-}; fi
        for i in $(seq "$lo" "$hi"); do
            name=$(printf 'run.tgz.part-%03d' "$i")
            [ -f "$RUN/pack/$name" ] || break
            cp "$RUN/pack/$name" "$OUT/"; echo "pipeline_node: $name to OUT"
        done
    fi
}

case "$cmd" in
    start)
        if [ -n "${BUNDLE:-}" ]; then
            # shellcheck disable=SC1091
            source scripts/libero_offline.sh "$BUNDLE" || exit 1
        fi
        mkdir -p "$RUN"
        nproc; nvidia-smi -L 2>/dev/null || true
        # which OpenGL renderer MuJoCo's EGL context gets (the GPU's, or Mesa's software one)
        $PY -c "import mujoco; c = mujoco.GLContext(64, 64); c.make_current(); from OpenGL import GL; print('GL renderer:', GL.glGetString(GL.GL_RENDERER).decode(), flush=True); import os; os._exit(0)" 2>&1 | tail -1
        PYTHONUNBUFFERED=1 setsid nohup scripts/policy_pipeline.sh > "$RUN/nohup.log" 2>&1 < /dev/null &
        sleep 5
        poll
        ;;
    poll)
        if [ -n "${BUNDLE:-}" ]; then
            # shellcheck disable=SC1091
            source scripts/libero_offline.sh "$BUNDLE" > /dev/null 2>&1 || true
        fi
        poll "${3:-}"
        ;;
esac
