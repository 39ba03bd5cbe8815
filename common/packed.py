"""Packed arrays (docs/DESIGN.md §8.3): training frames as one ``.npz``, its writer and its reader.

Small enough to train on a machine without h5py or LIBERO; loaded with ``allow_pickle=False``. Frames:
``proprio [N, 8]``, ``episode [N]``, ``step [N]``; camera c in {0 agentview, 1 wrist} as ``cam{c}_codec``
(``"delta-lzma"``: lossless per-episode mod-256 differences; or ``"jpeg"``), ``cam{c}_offsets``,
``cam{c}_bytes``; ``images_shape = (N, 2, S, S, 3)`` at the policy's input size; per episode
``instruction_of_episode``, ``task_of_episode``, ``episode_names``. Every other array of the frame dict
is stored as it is: demonstration packs (``common.demos.read_demos``) add ``actions [M, A]`` and
``action_episode [M]`` (every step: exact chunk targets) and ``init_check``; on-policy packs
(``trainer.pack_onpolicy``) add the policy's ``codes [N, T, H, L]``, ``init_of_episode``,
``success_of_episode``, ``backbone``.
"""

from __future__ import annotations

import io
import logging
import lzma
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

log = logging.getLogger(__name__)


def pack(data: dict[str, Any], path: Path, jpeg_quality: int) -> None:
    """Write ``data`` (from :func:`common.demos.read_demos`, or on-policy frames
    of ``trainer.pack_onpolicy``) as one .npz.

    Agentview frames are stored losslessly (per-episode temporal difference + LZMA: the scene is
    mostly static); wrist frames as JPEG of quality ``jpeg_quality`` (0: lossless like agentview).
    """
    out = {k: v for k, v in data.items() if k != "images"}
    imgs = data["images"]  # [N, 2, S, S, 3]
    out["images_shape"] = np.array(imgs.shape, dtype=np.int64)
    for cam in range(imgs.shape[1]):
        blobs: list[bytes] = []
        if cam == 1 and jpeg_quality:
            for img in tqdm(imgs[:, cam], desc="wrist jpeg", unit="img"):
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="JPEG", quality=jpeg_quality)
                blobs.append(buf.getvalue())
        else:
            for e in tqdm(range(len(data["episode_names"])), desc=f"camera {cam} lzma", unit="ep"):
                x = imgs[data["episode"] == e, cam].astype(np.int16)  # [n, S, S, 3]
                delta = np.diff(x, axis=0, prepend=0).astype(np.uint8)  # mod-256 difference
                blobs.append(lzma.compress(delta.tobytes(), preset=6))
        out[f"cam{cam}_codec"] = np.array("jpeg" if cam == 1 and jpeg_quality else "delta-lzma")
        out[f"cam{cam}_offsets"] = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
        out[f"cam{cam}_bytes"] = np.frombuffer(b"".join(blobs), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    log.info(
        "packed %d frames of %d episodes to %s (%.1f MB)",
        len(data["episode"]),
        len(data["episode_names"]),
        path,
        path.stat().st_size / 1e6,
    )


def unpack(path: Path) -> dict[str, Any]:
    """Inverse of :func:`pack`."""
    z = np.load(path, allow_pickle=False)
    data = {k: z[k] for k in z.files if not k.startswith("cam") and k != "images_shape"}
    shape = tuple(int(v) for v in z["images_shape"])  # (N, 2, S, S, 3)
    images = np.empty(shape, dtype=np.uint8)
    for cam in range(shape[1]):
        codec, offsets, blob = str(z[f"cam{cam}_codec"]), z[f"cam{cam}_offsets"], z[f"cam{cam}_bytes"]
        if codec == "jpeg":
            for i in tqdm(range(shape[0]), desc=f"camera {cam} jpeg", unit="img"):
                raw = blob[offsets[i] : offsets[i + 1]].tobytes()
                images[i, cam] = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
        else:
            for e in range(len(data["episode_names"])):
                rows = np.flatnonzero(data["episode"] == e)
                raw = lzma.decompress(blob[offsets[e] : offsets[e + 1]].tobytes())
                delta = np.frombuffer(raw, dtype=np.uint8).reshape(len(rows), *shape[2:])
                images[rows, cam] = np.cumsum(delta, axis=0, dtype=np.uint8)  # mod-256 running sum
    data["images"] = images
    return data
