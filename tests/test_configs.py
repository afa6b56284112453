"""Every shipped config passes ``kd-train --validate`` (hub models that are not cached offline
have their model checks reported as skipped, everything else is checked)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdcore.assemble import validate_models
from kdcore.config import load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.relative_to(REPO) for p in (REPO / "configs").rglob("*.yaml"))


def test_configs_exist():
    assert Path("configs/quickstart.yaml") in CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=str)
def test_config_validates(path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_config(path)
    notes = validate_models(cfg)
    assert notes
