"""Verbs run too early name the verb to run first, before starting any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from ray_qlora.config import parse_config
from ray_qlora.errors import StageOrderError
from ray_qlora.pipeline import Run, run_stage


@pytest.mark.parametrize("stage, needs", [("tune", "prepare"), ("merge", "tune"), ("evaluate", "merge"),
                                          ("serve", "merge")])
def test_a_stage_before_the_one_it_needs_is_refused(tmp_path: Path, stage: str, needs: str) -> None:
    cfg = parse_config({"run": {"output_uri": str(tmp_path)}, "data": {"input_uris": [str(tmp_path)]}})
    with pytest.raises(StageOrderError, match=f"stage '{needs}' has not succeeded.*ray-qlora {needs}"):
        run_stage(Run(cfg, "fresh"), stage)
