"""Fresh initial states: a new random object placement per seed, checked against the benchmark scenes.

LIBERO samples the objects' placement in the task's regions (with robosuite's default arm-joint noise, as
in the benchmark states) from a seed kept apart from the benchmark episodes' fixture seeds. A placement
is redrawn (attempt k of the same seed, deterministic) when, while settling, an object slides further
than it does in the benchmark scene (its placement overlapped another) or comes to rest at another
height (on another object). :meth:`producer.env.LiberoEnv.reset` drives the draws; this module holds
the seeds and the check, as plain functions of the objects' positions.
"""

from __future__ import annotations

import numpy as np

#: Gaussian noise (rad) on the arm joints of a fresh start: robosuite's "default", the spread (std about
#: 0.02) of the arm joints over LIBERO's benchmark initial states. Benchmark starts restore their own.
FRESH_JOINT_NOISE = 0.02
FRESH_STREAM = 0x0F4E5  # keeps fresh-seed scenes apart from the benchmark episodes' fixture seeds
FRESH_ATTEMPTS = 50  # draws of one fresh seed before giving up
FRESH_MAX_SLIDE = 0.01  # m: an object sliding further (than in the benchmark scene) was placed overlapping
FRESH_MAX_DZ = 0.005  # m: an object resting higher or lower than in the benchmark scenes lies on another


def fresh_seed(env_seed: int, task_id: int, seed: int, attempt: int = 0) -> int:
    """The seed of a fresh scene (placements, arm noise): per task, apart from the benchmark episodes'."""
    entropy = [env_seed, FRESH_STREAM, task_id, seed, attempt]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def settle_motion(placed: np.ndarray, settled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(how far each object slid in xy while settling [objects], the height it came to rest at [objects])
    from its placed and settled positions ([objects, 3] each)."""
    return np.linalg.norm(settled[:, :2] - placed[:, :2], axis=1), settled[:, 2]


def placement_problem(
    placed: np.ndarray,
    settled: np.ndarray,
    reference: tuple[np.ndarray, np.ndarray],
    names: list[str],
) -> str | None:
    """Why a settled scene is not a valid start (None: valid), against ``reference``, the
    :func:`settle_motion` of the benchmark scene: an object slid further than there, or rests at
    another height. ``placed``, ``settled``: [objects, 3]; ``names``: the objects in that order."""
    ref_slide, rest_z = reference
    slide, z = settle_motion(placed, settled)
    slide = slide - ref_slide
    dz = np.abs(z - rest_z)
    if slide.max() > FRESH_MAX_SLIDE:
        return (
            f"{names[int(slide.argmax())]} slid {1000 * slide.max():.0f} mm more than in the benchmark scene"
        )
    if dz.max() > FRESH_MAX_DZ:
        return f"{names[int(dz.argmax())]} rests {1000 * dz.max():.0f} mm off its benchmark height"
    return None
