"""The quickstart measurement grids (docs/kd-vs-sft.md, docs/s2ft.md) expand to the runs their
documents describe: the same step budget, data and seeds for every run, only the studied setting
varying. Validation only (no model is loaded), so a config change that breaks them is caught."""

from __future__ import annotations

import conftest
from kdcore.grid import expand, load_grid, validate_runs


def _runs(name, monkeypatch):
    monkeypatch.chdir(conftest.REPO)  # the quickstart's data_dir is relative to the repository root
    grid = load_grid(conftest.REPO / "configs" / "grids" / name)
    runs = expand(grid)
    validate_runs(grid, runs, check_models=False)
    return runs


def _budget(run):
    r = run.resolved
    return (r["run"]["seed"], r["train"]["epochs"], r["train"]["max_steps"], r["train"]["micro_batch_size"],
            r["task"]["data_dir"])


def test_tuner_grid_compares_the_three_tuners_at_one_budget(monkeypatch):
    runs = _runs("quickstart-tuners.yaml", monkeypatch)
    tuners = {r.name: (r.resolved["student"]["tuner"]["name"], r.resolved["train"]["lr"]) for r in runs}
    assert tuners == {"full": ("full", 3.0e-4), "lora": ("lora", 1.0e-3), "s2ft": ("s2ft", 1.0e-3)}
    assert len({_budget(r) for r in runs}) == 1


def test_kd_vs_sft_grid_has_one_sft_twin_and_three_divergences(monkeypatch):
    runs = _runs("quickstart-kd-vs-sft.yaml", monkeypatch)
    methods = {(r.resolved["criterion"]["name"], r.resolved["objective"]["kd_weight"]) for r in runs}
    assert methods == {("fkl", 0.0), ("fkl", 0.5), ("srkl", 0.5), ("akl", 0.5)}
    assert {tuple(r.resolved["student"]["keep_layers"]) for r in runs} == {(0, 1, 2, 3, 4, 5, *range(20, 30))}
    assert len({_budget(r) for r in runs}) == 1
