"""tools.render_profile on the real simulator: every variant is timed and compared with the default."""

from __future__ import annotations

import json

import pytest

from tools.render_profile import main


@pytest.mark.sim
def test_render_profile_reports_every_variant(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["--sizes", "32", "--repeats", "1", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    variants = [r["variant"] for r in rep["rows"]]
    assert variants == ["default", "multisampling off", "reflection off", "both off"]
    assert rep["rows"][0]["mean_abs_diff"] == 0 and all(r["render_ms"] > 0 for r in rep["rows"])
    assert rep["physics_step_ms"] > 0 and rep["scene"]["mesh_faces"] > 0
    # turning both off changes the policy's input: the tool must see that
    assert rep["rows"][-1]["max_abs_diff"] > 0
    assert "reflection off" in capsys.readouterr().out
