#!/usr/bin/env bash
# Fit a K = 3 draft by distillation from the shipped embedded VLA on a CUDA machine.
#
# Needs only torch, transformers and safetensors (no h5py, no LIBERO): the demonstrations travel as
# one lossless .npz packed on the CPU machine:
#   python -m trainer.train_vla --demos data/demos/libero_spatial_expert.hdf5 \
#       --pack-to runs/distill/packed_lossless.npz --jpeg-quality 0
# Usage:
#   scripts/gpu_fit_draft.sh PACKED OUT_DIR NAME [fit_draft options...]
# writes OUT_DIR/NAME.pt (slim checkpoint: docs/DESIGN.md §5.5 keys, no optimizer state), NAME.json (summary
# with per-epoch history) and NAME.log; the extracted (hidden, codes) pairs are cached in $CACHE
# (default /tmp/rsd_fit_cache.npz) and reused by later runs with at most as many --augment views.
# Score the result on the CPU machine with
#   python -m trainer.fit_draft --demos FILE --evaluate OUT_DIR/NAME.pt --out scores.json
set -euo pipefail
packed=$1 out=$2 name=$3
shift 3
mkdir -p "$out"
export TQDM_DISABLE=1 PYTHONUNBUFFERED=1
python -m trainer.fit_draft --packed "$packed" --device cuda --extract-batch 512 --threads 4 \
    --cache "${CACHE:-/tmp/rsd_fit_cache.npz}" --slim --out "$out/$name.pt" "$@" 2>&1 | tee "$out/$name.log"
