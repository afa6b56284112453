"""Every shipped experiment config passes ``kd-train --validate``.

Hub models that are not cached offline have their model checks reported as skipped (the
config, components and data are still checked); configs under configs/tiny/ validate against
the tiny pair, linked where they expect it (runs/tiny-pair). Grid files (configs/grids/) are
not experiment configs: tests/test_grid.py checks them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kdcore.assemble import validate_models
from kdcore.config import load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.relative_to(REPO) for p in (REPO / "configs").rglob("*.yaml") if "grids" not in p.parts)


def test_configs_exist():
    assert Path("configs/quickstart.yaml") in CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=str)
def test_config_validates(path, repo_like_cwd, monkeypatch):
    monkeypatch.chdir(repo_like_cwd)
    notes = validate_models(load_config(path))
    assert notes
