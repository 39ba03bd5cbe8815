"""Where a simulator step's time goes on a CPU renderer, and what each rendering setting would buy.

One LIBERO task is reset and stepped; the physics step and the two-camera render are timed (medians),
at the policy's image sizes and with MuJoCo settings that change the cost of the software rasterizer:
multisampling off (``vis.quality.offsamples = 0``) and the floor reflection off (``mjRND_REFLECTION``).
Each variant's images are compared with the default's (mean and max absolute pixel difference): a
setting that changes the images changes the policy's input, so it is only usable by a policy trained
on such images.

    MUJOCO_GL=egl python -m tools.render_profile --out runs/render_profile.json
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from common.cli import new_parser


def _median_ms(fn, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up (context and texture upload)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times)), out


def profile(task: int, sizes: list[int], repeats: int) -> dict:
    import mujoco

    from producer.env import EnvConfig, LiberoEnv

    rows = []
    with LiberoEnv(EnvConfig(task_id=task, image_size=max(sizes))) as env:
        env.reset(init_state=0)
        sim = env._env.sim
        model = sim.model._model
        ctx = sim._render_context_offscreen
        rng = np.random.default_rng(0)
        step_ms, _ = _median_ms(lambda: env.step(rng.uniform(-0.2, 0.2, 7), observe=False), repeats * 4)

        def render(size: int):
            return [sim.render(camera_name=c, width=size, height=size, depth=False) for c in env.cfg.cameras]

        def rebuild() -> None:  # a new MjrContext picks up changed vis.quality values
            ctx.gl_ctx.make_current()
            ctx.con.free()
            ctx._set_mujoco_context_and_buffers()

        base = {}
        for size in sizes:
            ms, imgs = _median_ms(lambda size=size: render(size), repeats)
            base[size] = imgs
            rows.append(
                {"variant": "default", "size": size, "render_ms": ms, "mean_abs_diff": 0.0, "max_abs_diff": 0}
            )

        def variant(name: str) -> None:
            for size in sizes:
                ms, imgs = _median_ms(lambda size=size: render(size), repeats)
                diff = [np.abs(a.astype(int) - b.astype(int)) for a, b in zip(imgs, base[size])]
                rows.append({"variant": name, "size": size, "render_ms": ms,
                             "mean_abs_diff": float(np.mean([d.mean() for d in diff])),
                             "max_abs_diff": int(max(d.max() for d in diff))})  # fmt: skip

        samples = int(model.vis.quality.offsamples)
        model.vis.quality.offsamples = 0
        rebuild()
        variant("multisampling off")
        model.vis.quality.offsamples = samples
        rebuild()
        ctx.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        variant("reflection off")
        model.vis.quality.offsamples = 0
        rebuild()
        variant("both off")
        scene = {"geoms": int(model.ngeom), "mesh_faces": int(model.nmeshface), "lights": int(model.nlight),
                 "shadow_casting_lights": int(np.sum(model.light_castshadow)), "offsamples": samples}  # fmt: skip
    return {"task": task, "physics_step_ms": step_ms, "cameras": 2, "scene": scene, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = new_parser(description=__doc__, prog="python -m tools.render_profile")
    p.add_argument("--task", type=int, default=0, help="libero_spatial task id")
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 64], help="square image sizes to render")
    p.add_argument("--repeats", type=int, default=8, help="timed renders per setting")
    p.add_argument("--out", type=Path, default=None, help="write the report here (JSON)")
    args = p.parse_args(argv)
    rep = profile(args.task, args.sizes, args.repeats)
    print(f"physics step {rep['physics_step_ms']:.1f} ms; scene {rep['scene']}")
    print(f"{'variant':<20} {'size':>4} {'2 cameras ms':>13} {'mean |diff|':>11} {'max |diff|':>10}")
    for r in rep["rows"]:
        print(
            f"{r['variant']:<20} {r['size']:>4} {r['render_ms']:>13.1f} {r['mean_abs_diff']:>11.2f} {r['max_abs_diff']:>10}"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rep, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
