"""Pseudo-target plugins (``teacher``, ``student``, ``joint``; seed-methods §1.5): the block
cache resumes after a kill and is keyed by its config, PTs rotate across epochs, on-policy PTs
come from the current weights, Joint-Teaching's weights, gold mixing, bad settings, and every
plugin trains across tokenizers."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from kdcore.cli import main
from kdcore.config import load_config
from kdcore.data import IGNORE
from kdcore.distributed import DistInfo
from kdcore.errors import ConfigError
from kdcore.trainer import Trainer

import conftest

TINY_TASK = {"max_examples": 16}


def records(run_dir: Path, split="train"):
    return [r for r in (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())
            if r["split"] == split]


def teacher_targets(tmp_path, **extra):
    node = {"name": "teacher", "cache_dir": str(tmp_path / "pt-cache"), "block_size": 4,
            "decoding": {"max_new_tokens": 6}}
    node.update(extra)
    return node


def started(path, overrides=()):
    """A trainer whose run has started (hooks registered, PTs generated), before any step."""
    trainer = Trainer(load_config(path, list(overrides)), DistInfo())
    trainer._start()
    return trainer


def responses(tokenizer, batch):
    """The response texts of a collated micro-batch's student side (labels, eos dropped)."""
    out = []
    for row in batch["student"]["labels"]:
        ids = [int(t) for t in row if t != IGNORE]
        out.append(tokenizer.decode(ids, skip_special_tokens=True))
    return out


def cache_file(tmp_path) -> Path:
    files = sorted((tmp_path / "pt-cache").glob("pt-*.jsonl"))
    assert len(files) == 1, files
    return files[0]


# -- teacher ---------------------------------------------------------------------------------------

def test_teacher_pts_rotate_across_epochs(make_config, tmp_path):
    # 16 examples, global batch 4: 4 steps per epoch; K = 2 sampled PTs per prompt
    path = make_config({"task": TINY_TASK, "targets": teacher_targets(tmp_path, num_targets=2),
                        "train": {"max_steps": 8}})
    trainer = started(path)
    plugin, tok = trainer.parts.targets, trainer.parts.student_tokenizer
    assert len(plugin.pts) == 16 and all(len(row) == 2 for row in plugin.pts)
    assert any(a != b for a, b in plugin.pts), "two samples per prompt should not all coincide"
    for step, view in ((0, 0), (3, 0), (4, 1), (7, 1), (8, 0)):
        trainer.step = step
        idx = trainer.data.plan().micro_batches(step)[0]
        batch = plugin.step_batches(trainer.data.micro_batches(step), trainer.run)[0]
        assert responses(tok, batch) == [plugin.pts[i][view].strip() for i in idx]
        # the prompt part is the task's own encoding of the same prompt
        gold = trainer.data.micro_batches(step)[0]
        prompt = int((gold["student"]["labels"][0] != IGNORE).nonzero()[0]) + 1  # prompt tokens of row 0
        assert torch.equal(batch["student"]["input_ids"][0, :prompt], gold["student"]["input_ids"][0, :prompt])
    trainer.hooks.close()
    assert main(["--config", str(path), f"run.output_dir={tmp_path / 'trained'}"]) == 0
    assert [r["targets/pt_index"] for r in records(tmp_path / "trained")] == [0, 0, 0, 0, 1, 1, 1, 1]


def test_gold_weight_one_is_the_loader_batches_and_half_mixes(make_config, tmp_path):
    path = make_config({"task": TINY_TASK, "targets": teacher_targets(tmp_path, gold_weight=1.0)})
    trainer = started(path)
    loader = trainer.data.micro_batches(0)
    mixed = trainer.parts.targets.step_batches(trainer.data.micro_batches(0), trainer.run)
    for a, b in zip(loader, mixed):
        for side in ("student", "teacher"):
            for key in a[side]:
                assert torch.equal(a[side][key], b[side][key])
    trainer.hooks.close()
    half = started(make_config({"task": TINY_TASK, "targets": teacher_targets(tmp_path, gold_weight=0.5)}, name="h.yaml"))
    plugin = half.parts.targets
    kept = [plugin.is_gold(half.run, i) for i in range(16)]
    assert 0 < sum(kept) < 16  # a seeded draw per example ...
    assert kept == [plugin.is_gold(half.run, i) for i in range(16)]  # ... that is reproducible
    half.step = 1
    assert kept != [plugin.is_gold(half.run, i) for i in range(16)]  # ... and redrawn every step
    half.hooks.close()


class Killed(Exception):
    pass


def test_teacher_cache_resumes_after_a_kill(make_config, tmp_path, monkeypatch):
    import kdcore_plugins.targets.teacher as teacher_module

    whole = make_config({"task": TINY_TASK, "targets": teacher_targets(tmp_path / "a", num_targets=2)}, name="a.yaml")
    assert main(["--config", str(whole), f"run.output_dir={tmp_path / 'a-run'}"]) == 0
    reference = cache_file(tmp_path / "a").read_text()
    assert len(reference.splitlines()) == 1 + 16

    real, calls = teacher_module.generate_pts, []

    def dies_in_block_three(*args, **kwargs):
        calls.append(kwargs["seed"])
        if len(calls) == 3:
            path = cache_file(tmp_path / "b")
            with path.open("a") as fh:  # the writer was killed half-way through a line
                fh.write('{"i": 8, "targets": ["half a')
            raise Killed()
        return real(*args, **kwargs)

    cut = make_config({"task": TINY_TASK, "targets": teacher_targets(tmp_path / "b", num_targets=2)}, name="b.yaml")
    monkeypatch.setattr(teacher_module, "generate_pts", dies_in_block_three)
    killed = Trainer(load_config(cut, [f"run.output_dir={tmp_path / 'b-run'}"]), DistInfo())
    with pytest.raises(Killed):
        killed.train()
    assert not killed.hooks._mine  # a failed run unhooks its components (later runs of the process are clean)
    assert len(cache_file(tmp_path / "b").read_text().splitlines()) == 1 + 8 + 1  # two blocks and a torn line
    monkeypatch.setattr(teacher_module, "generate_pts", real)
    calls.clear()
    spy = lambda *a, **k: (calls.append(k["seed"]), real(*a, **k))[1]
    monkeypatch.setattr(teacher_module, "generate_pts", spy)
    assert main(["--config", str(cut), f"run.output_dir={tmp_path / 'b-run2'}"]) == 0
    assert calls == [1 + 2, 1 + 3]  # only blocks 2 and 3 (seeded sample_seed + b) were generated again
    assert cache_file(tmp_path / "b").read_text() == reference
    calls.clear()
    assert main(["--config", str(cut), f"run.output_dir={tmp_path / 'b-run3'}"]) == 0
    assert calls == []  # complete: nothing generated


def test_changed_decoding_regenerates_and_a_foreign_file_is_refused(make_config, tmp_path):
    first = make_config({"task": TINY_TASK, "targets": teacher_targets(tmp_path)}, name="a.yaml")
    assert main(["--config", str(first), f"run.output_dir={tmp_path / 'r1'}"]) == 0
    old = cache_file(tmp_path)
    hotter = teacher_targets(tmp_path, decoding={"max_new_tokens": 6, "temperature": 1.5})
    second = make_config({"task": TINY_TASK, "targets": hotter}, name="b.yaml")
    assert main(["--config", str(second), f"run.output_dir={tmp_path / 'r2'}"]) == 0
    files = sorted((tmp_path / "pt-cache").glob("pt-*.jsonl"))
    assert len(files) == 2 and old in files
    new = next(f for f in files if f != old)
    new.write_text(old.read_text())  # a file whose header belongs to another config
    refused = Trainer(load_config(second, [f"run.output_dir={tmp_path / 'r3'}"]), DistInfo())
    with pytest.raises(ConfigError, match=r"another configuration \(differs in: decoding, generation\)"):
        refused.train()


def test_unlabelled_inputs_join_with_pts_only(make_config, tmp_path):
    extra = {"name": "instruction", "files": {"train": str(conftest.DATA_DIR / "test.jsonl")}, "max_examples": 8}
    path = make_config({"task": TINY_TASK, "targets": teacher_targets(tmp_path, unlabelled=extra, gold_weight=1.0)})
    trainer = started(path)
    plugin = trainer.parts.targets
    assert len(trainer.data.train_set) == 24 and len(plugin.pts) == 24 and plugin.n_labelled == 16
    assert trainer.data.train_set.examples[20].response == ""
    assert [plugin.is_gold(trainer.run, i) for i in (0, 15, 16, 23)] == [True, True, False, False]
    trainer.hooks.close()


@pytest.mark.parametrize("node, message", [
    ({"num_targets": 0}, r"targets.num_targets: must be >= 1, got 0"),
    ({"decoding": {"strategy": "beam", "temperature": 0.7}},
     r"temperature is a sampling option; strategy 'beam' does not sample"),
    ({"decoding": {"strategy": "greedy", "top_p": 0.9, "top_k": 5}}, r"top_k, top_p are sampling options"),
    ({"decoding": {"temprature": 0.7}}, r"temprature.*temperature"),
    ({"num_targets": 3, "decoding": {"strategy": "greedy"}}, r"greedy decoding gives one sequence per prompt"),
    ({"num_targets": 4, "decoding": {"strategy": "beam", "num_beams": 2}}, r"num_beams \(2\) must be at least num_targets \(4\)"),
    ({"decoding": {"num_beams": 4}}, r"num_beams needs strategy: beam"),
])
def test_bad_pt_settings_are_one_config_error(make_config, tmp_path, capsys, node, message):
    path = make_config({"targets": {**teacher_targets(tmp_path), **node}})
    assert main(["--config", str(path), "--validate"]) != 0
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if line.strip()]) == 1 and "Traceback" not in err
    import re
    assert re.search(message, err), err


def test_teacher_targets_need_a_teacher_and_its_weights(make_config, tmp_path):
    with pytest.raises(ConfigError, match="teacher: missing section; targets 'teacher' generates with the teacher"):
        load_config(make_config({"teacher": None, "objective": {"kd_weight": 0.0}, "targets": teacher_targets(tmp_path)}))
    for node in (teacher_targets(tmp_path), student_targets()):
        with pytest.raises(ConfigError, match=f"teacher.cache: targets '{node['name']}' trains on generated sequences"):
            load_config(make_config({"teacher": {"cache": str(tmp_path)}, "targets": node}))
    seqkd = load_config(make_config({"objective": {"kd_weight": 0.0}, "targets": teacher_targets(tmp_path)}))
    assert seqkd.uses_teacher  # SeqKD: CE only, and still the teacher is loaded to generate
    assert not load_config(make_config({"objective": {"kd_weight": 0.0}})).uses_teacher


# -- student (on-policy) ---------------------------------------------------------------------------

def student_targets(**extra):
    node = {"name": "student", "probability": 1.0, "decoding": {"max_new_tokens": 8}}
    node.update(extra)
    return node


def test_on_policy_pts_come_from_the_current_weights(make_config, tmp_path):
    from kdcore_plugins.targets._decoding import generate_pts
    from kdcore_plugins.targets._steps import int_seed

    path = make_config({"task": TINY_TASK, "targets": student_targets(), "train": {"lr": 0.05}})
    trainer = started(path)
    plugin, run, model = trainer.parts.targets, trainer.run, trainer.parts.student_model
    prompts = [trainer.data.train_set.examples[i].prompt for i in trainer.data.plan().micro_batches(0)[0]]

    def direct():  # what the student's weights of this moment sample with the step's seed
        out, _, _ = generate_pts(model, trainer.parts.student_tokenizer, prompts, plugin.decoding, run.task,
                                 seed=int_seed(plugin.sample_seed, 0, 0, 0), progress=False)
        return [o[0] for o in out]

    before_weights = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    batches = plugin.step_batches(trainer.data.micro_batches(0), run)
    before = plugin.last_pts[0]
    assert torch.equal(torch.get_rng_state(), rng)  # generating left the training RNG stream alone
    assert model.training  # and training mode restored
    assert before == direct()
    assert responses(trainer.parts.student_tokenizer, batches[0]) == [p.strip() for p in before]
    trainer.train_step(trainer.data.micro_batches(0))  # one optimizer step changes the weights ...
    assert any(not torch.equal(before_weights[k], v) for k, v in model.state_dict().items())
    trainer.step = 0  # ... and the same step (same seed) now samples other sequences: the new weights'
    plugin.step_batches(trainer.data.micro_batches(0), run)
    after = plugin.last_pts[0]
    assert after != before and after == direct()
    trainer.hooks.close()


def test_student_probability_is_a_seeded_draw_per_micro_batch(make_config, tmp_path):
    path = make_config({"task": TINY_TASK, "targets": student_targets(probability=0.5),
                        "train": {"max_steps": 4, "micro_batch_size": 2, "grad_accum": 2}})
    assert main(["--config", str(path)]) == 0
    fractions = [r["targets/student_fraction"] for r in records(tmp_path / "run")]
    assert set(fractions) <= {0.0, 0.5, 1.0} and 0 < sum(fractions) < 4
    generated = [r["gen/tokens"] for r in records(tmp_path / "run")]
    assert all((g > 0) == (f > 0) for g, f in zip(generated, fractions))
    summary = records(tmp_path / "run", "summary")[-1]
    assert summary["gen/tokens_total"] == sum(generated) and summary["gen/tokens_per_s"] > 0
    assert main(["--config", str(path), f"run.output_dir={tmp_path / 'again'}"]) == 0
    assert [r["targets/student_fraction"] for r in records(tmp_path / "again")] == fractions


# -- joint (Joint-Teaching) ------------------------------------------------------------------------

def test_joint_alternation_follows_the_student_weight():
    from kdcore_plugins.targets._steps import on_every

    assert [on_every(s, 0.5) for s in range(6)] == [False, True, False, True, False, True]
    assert [on_every(s, 1 / 3) for s in range(6)] == [False, False, True, False, False, True]
    assert not any(on_every(s, 0.0) for s in range(10)) and all(on_every(s, 1.0) for s in range(10))
    assert sum(on_every(s, 0.29) for s in range(100)) == 29  # exact, no float drift


def joint_targets(tmp_path, **extra):
    node = {**teacher_targets(tmp_path), "name": "joint", "student_decoding": {"max_new_tokens": 6}}
    node.update(extra)
    return node


def test_joint_weights_gold_ce_and_pt_kd(make_config, tmp_path):
    from kdcore.distill import move
    from kdcore.data import response_tokens

    alpha = 0.3
    path = make_config({"task": TINY_TASK, "targets": joint_targets(tmp_path), "objective": {"kd_weight": alpha}})
    trainer = started(path)
    plugin, module = trainer.parts.targets, trainer.module
    for step, student in ((0, False), (1, True)):
        trainer.step = step
        batches = plugin.step_batches(trainer.data.micro_batches(step), trainer.run)
        assert plugin.last["targets/student_step"] == float(student)
        pt, gold = batches  # grad_accum 1: one PT micro-batch (KD only) and the gold one (CE only)
        assert pt["terms"] == {"ce": False, "kd": True} and gold["terms"] == {"ce": True, "kd": False}
        assert gold["student"] is trainer.data.micro_batches(step)[0]["student"] or torch.equal(
            gold["student"]["labels"], trainer.data.micro_batches(step)[0]["student"]["labels"])
        with torch.no_grad():
            out_pt, out_gold = module(move(pt, trainer.device)), module(move(gold, trainer.device))
            plain = module(move({k: v for k, v in pt.items() if k != "terms"}, trainer.device))
        kd_names = [k for k in plain.terms if k != "ce"]
        assert kd_names and set(out_pt.terms) == set(kd_names) and set(out_gold.terms) == {"ce"}
        for k in kd_names:  # the KD terms on the PT are those of an unrestricted pass
            assert torch.allclose(out_pt.terms[k], plain.terms[k])
        kd_sum = sum(out_pt.terms[k] for k in kd_names)
        assert torch.allclose(out_pt.loss, alpha * kd_sum)
        assert torch.allclose(out_gold.loss, (1 - alpha) * out_gold.terms["ce"])
        n = response_tokens(pt) + response_tokens(gold)
        metrics = trainer.accumulate(batches)
        expected = ((1 - alpha) * out_gold.terms["ce"] + alpha * kd_sum) / n
        assert metrics["loss"] == pytest.approx(float(expected), rel=1e-5)
        assert metrics["tokens"] == n
        module.zero_grad(set_to_none=True)
    trainer.hooks.close()


def test_joint_with_pure_kd_runs_no_gold_batches_and_needs_kd(make_config, tmp_path):
    path = make_config({"task": TINY_TASK, "targets": joint_targets(tmp_path, student_weight=1.0),
                        "objective": {"kd_weight": 1.0}})
    trainer = started(path)
    assert trainer.parts.targets.pts is None  # only student PTs: no teacher generation at all
    batches = trainer.parts.targets.step_batches(trainer.data.micro_batches(0), trainer.run)
    assert len(batches) == 1 and "terms" not in batches[0]
    trainer.hooks.close()
    bad = make_config({"task": TINY_TASK, "targets": joint_targets(tmp_path), "objective": {"kd_weight": 0.0}}, name="b.yaml")
    assert main(["--config", str(bad)]) != 0


# -- SeqKD = teacher PTs + kd_weight 0 -------------------------------------------------------------

def test_seqkd_is_teacher_targets_with_ce_only_across_tokenizers(make_config, tmp_path, tiny_pair):
    # the cross-tokenizer pair with the default identity aligner: a teacher that only generates is not aligned
    path = make_config({"task": TINY_TASK, "teacher": {"path": str(tiny_pair["teacher"])},
                        "student": {"path": str(tiny_pair["student"])}, "objective": {"kd_weight": 0.0},
                        "targets": teacher_targets(tmp_path)})
    assert main(["--config", str(path)]) == 0
    steps = records(tmp_path / "run")
    assert all(r["loss"] == pytest.approx(r["ce"]) and not any(k.startswith("kd_") for k in r) for r in steps)
    assert all("time/teacher_forward" not in r for r in steps)  # CE on the PTs: the teacher never runs a step
    assert steps[0]["gen/tokens"] > 0 and len(cache_file(tmp_path).read_text().splitlines()) == 1 + 16


# -- every targets plugin trains, same tokenizer and across tokenizers ---------------------------

BUILT_IN = ["gold", "teacher", "student", "joint"]
PAIRS = {"identity+none": ("student_same", {"aligner": "identity", "projector": "none"}),
         "cma+dual": ("student", {"aligner": "cma", "projector": "dual"})}


def test_the_matrix_covers_every_built_in():
    from kdcore import names

    assert sorted(BUILT_IN) == sorted(names("targets"))


def plugin_node(name, tmp_path):
    return {"gold": {"name": "gold"}, "teacher": teacher_targets(tmp_path, num_targets=2),
            "student": student_targets(), "joint": joint_targets(tmp_path)}[name]


@pytest.mark.parametrize("pair", list(PAIRS))
@pytest.mark.parametrize("name", BUILT_IN)
def test_every_targets_plugin_trains_on_the_tiny_pair(make_config, tmp_path, tiny_pair, name, pair):
    student, parts = PAIRS[pair]
    path = make_config({"task": TINY_TASK, "teacher": {"path": str(tiny_pair["teacher"])},
                        "student": {"path": str(tiny_pair[student])}, **parts, "targets": plugin_node(name, tmp_path),
                        "train": {"max_steps": 2}, "eval": {"max_examples": 4}})
    assert main(["--config", str(path)]) == 0
    steps = records(tmp_path / "run")
    assert len(steps) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    assert any(k.startswith("kd_") for k in steps[0])
    if name != "gold":
        assert sum(r["gen/tokens"] for r in steps) > 0  # the student plugin generates on every micro-batch here


def test_pts_are_retokenised_by_both_tokenizers(make_config, tmp_path, tiny_pair):
    path = make_config({"task": TINY_TASK, "teacher": {"path": str(tiny_pair["teacher"])},
                        "student": {"path": str(tiny_pair["student"])}, "aligner": "cma", "projector": "dual",
                        "targets": teacher_targets(tmp_path)})
    trainer = started(path)
    plugin = trainer.parts.targets
    idx = trainer.data.plan().micro_batches(0)[0]
    batch = plugin.step_batches(trainer.data.micro_batches(0), trainer.run)[0]
    assert batch["teacher"] is not batch["student"]  # two encodings of the same text
    texts = {side: [] for side in ("student", "teacher")}
    for side, tok in (("student", trainer.parts.student_tokenizer), ("teacher", trainer.parts.teacher_tokenizer)):
        for row in batch[side]["labels"]:
            texts[side].append(tok.decode([int(t) for t in row if t != IGNORE], skip_special_tokens=True))
    norm = lambda t: " ".join(t.split())
    expected = [norm(plugin.pts[i][0]) for i in idx]
    assert [norm(t) for t in texts["teacher"]] == expected and [norm(t) for t in texts["student"]] == expected
    trainer.hooks.close()


def test_the_study_grid_validates_with_equal_steps_and_seeds(monkeypatch):
    from kdcore.grid import expand, load_grid, validate_runs

    monkeypatch.chdir(conftest.REPO)  # the quickstart's data_dir is relative to the repository root

    grid = load_grid(conftest.REPO / "configs" / "grids" / "targets-study.yaml")
    runs = expand(grid)
    validate_runs(grid, runs, check_models=False)
    methods = {(r.resolved["targets"]["name"], r.resolved["objective"]["kd_weight"]) for r in runs}
    assert methods == {("gold", 0.0), ("gold", 0.5), ("teacher", 0.0), ("teacher", 0.5), ("student", 0.5), ("joint", 0.5)}
    by_method = {}
    for r in runs:
        key = (r.resolved["targets"]["name"], r.resolved["objective"]["kd_weight"])
        by_method.setdefault(key, []).append((r.resolved["run"]["seed"], r.resolved["train"]["epochs"],
                                             r.resolved["train"]["max_steps"], r.resolved["train"]["micro_batch_size"]))
    assert len({tuple(sorted(v)) for v in by_method.values()}) == 1  # same seeds and step budget for every method
