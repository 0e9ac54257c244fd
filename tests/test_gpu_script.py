"""benchmarks/gpu.py, the prepared GPU run, still runs: its CPU smoke mode on a few photos.

The script only meets a GPU in the rare sessions that are lent one, so a change elsewhere could
break it unnoticed; this runs every task but the compiled rows (about 2 minutes: ``-m slow``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow
def test_gpu_script_cpu_smoke_runs_every_task(tmp_path, monkeypatch):
    from PIL import Image
    from skimage import data

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("astronaut", "chelsea", "coffee"):
        Image.fromarray(getattr(data, name)()).save(photos / f"{name}.jpg", quality=90)
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("gpu", None)
    import gpu

    out = tmp_path / "out"
    # no --proposals: random boxes (the prepared run gives a store); workers 0: in this process
    assert gpu.main(["--device", "cpu", "--quick", "--models", "FPN", "--variants", "defaults,packed",
                     "--images", str(photos), "--workers", "0", "--out", str(out)]) == 0  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert results["failed"] == [] and results["skipped"] == []
    assert [(r["variant"], r["settings"]) for r in results["steps"]] == [("defaults", "eager"),
                                                                          ("packed", "roi_pool=packed")]  # fmt: skip
    assert results["numerics"]["update_rel_diff"] == 0.0  # CPU against itself: the check's plumbing
    assert [r["decode"] for r in results["end_to_end"]] == ["worker", "device"]
    assert all(r["steps"] == 4 and r["images_per_s"] > 0 for r in results["end_to_end"])
    assert {r["method"] for r in results["roi"]} == {"per_level", "packed"}
