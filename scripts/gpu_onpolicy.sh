#!/usr/bin/env bash
# Fine-tune the embedded VLA on its own closed-loop frames, then fit the draft it allows, on a CUDA machine.
#
# Needs only torch, transformers and safetensors (no h5py, no LIBERO). Pack on the CPU machine first:
#   python -m trainer.pack_onpolicy --archives runs/stream_obs/archive.hdf5 --out runs/onpolicy/obs_q80.npz --jpeg-quality 80
#   (demonstrations: python -m trainer.train_vla --demos FILE --pack-to runs/distill/packed_q80.npz --jpeg-quality 80)
# Usage:
#   scripts/gpu_onpolicy.sh DEMOS_NPZ OBS_NPZ OUT_DIR NAME [train_vla options...]
# With train_vla options: fine-tunes from $INIT_FROM (default assets/embedded_vla) (--onpolicy OBS_NPZ, held-out initial states
# $VAL_INITS, default 40-49) into OUT_DIR/NAME/ (weights, metrics.json with the on-policy figures).
# Without: no fine-tuning (the shipped weights). Either way it then fits a K = 3 draft on the policy's
# own codes over the demonstrations and the on-policy frames of the other initial states and validates
# it on the held-out initial states' frames: OUT_DIR/NAME.draft.{pt,json,log}.
set -euo pipefail
demos=$1 obs=$2 out=$3 name=$4
shift 4
val=${VAL_INITS:-40-49}
mkdir -p "$out"
export TQDM_DISABLE=1 PYTHONUNBUFFERED=1
weights=${INIT_FROM:-assets/embedded_vla}  # the weights to fine-tune (and to score without options)
init=$weights
if [ $# -gt 0 ]; then
    python -m trainer.train_vla --packed "$demos" --onpolicy "$obs" --onpolicy-val-inits "$val" \
        --codec-dir assets/codec --init-from "$init" --device cuda --out-dir "$out/$name" "$@" \
        2>&1 | tee "$out/$name.vla.log"
    weights=$out/$name
fi
python -m trainer.fit_draft --packed "$demos" --observations "$obs" --val-inits "$val" --weights-dir "$weights" \
    --device cuda --extract-batch 512 --threads 4 --soft-weight 0.5 --epochs "${DRAFT_EPOCHS:-15}" --lr 3e-4 \
    --batch-size 64 --slim --out "$out/$name.draft.pt" 2>&1 | tee "$out/$name.draft.log"
