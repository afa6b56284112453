"""kdcore.grid (expansion, names, validation, run state), kdcore.grid_launch and kdcore.grid_report
through tools/grid.py (modes, resume/skip, report)."""

from __future__ import annotations

import csv
import importlib.util
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdcore import grid, grid_launch

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO / "data" / "kdcore-instruct"


def _load_tool():
    spec = importlib.util.spec_from_file_location("kdcore_tools_grid", REPO / "tools" / "grid.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


cli = _load_tool()


def write_grid(path: Path, **content) -> Path:
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


def fake_popen(calls, fail=()):
    """Stand-in for kd-train: records argv, writes final/config.json, exits 1 for runs in ``fail``."""

    def popen(argv, **kwargs):
        calls.append(list(argv))
        out = next(a for a in argv if a.startswith("run.output_dir=")).split("=", 1)[1]
        code = 1 if Path(out).name in fail else 0
        script = (f"import pathlib, sys; p = pathlib.Path({out!r}) / 'final'; p.mkdir(parents=True, exist_ok=True); "
                  f"(p / 'config.json').write_text('{{}}'); print('fake run'); sys.exit({code})")
        return subprocess.Popen([sys.executable, "-c", script], **kwargs)

    return popen


def no_launch(*args, **kwargs):
    raise AssertionError("the grid launched a run")


# ---------------------------------------------------------------------------------------------
# expansion and names (no models)
# ---------------------------------------------------------------------------------------------
def test_expand_counts_with_zip_and_exclude(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("schema_version: 1\n")
    path = write_grid(tmp_path / "g.yaml", base="base.yaml",
                      axes={"criterion.name": ["fkl", "rkl", "jsd"], "criterion.temperature": [1.0, 2.0, 3.0],
                            "objective.kd_weight": [0.5, 0.0], "train.lr": [1e-3, 1e-4]},
                      zip=[["criterion.name", "criterion.temperature"]],
                      exclude=[{"criterion.name": "rkl", "objective.kd_weight": 0.0}, {"train.lr": 1e-4, "criterion.name": "jsd"}])
    g = grid.load_grid(path, output_root=tmp_path / "out")
    runs = grid.expand(g)
    # zip: 3 (not 9) x 2 x 2 = 12, minus rkl&0.0 (2 runs) and jsd&1e-4 (2 runs) = 8
    assert len(runs) == 8
    assert [r.index for r in runs] == list(range(8))
    assert runs[0].values == {"criterion.name": "fkl", "criterion.temperature": 1.0, "objective.kd_weight": 0.5, "train.lr": 1e-3}
    assert runs[1].values["train.lr"] == 1e-4  # the last axis varies fastest
    assert all((r.values["criterion.name"], r.values["criterion.temperature"]) in {("fkl", 1.0), ("rkl", 2.0), ("jsd", 3.0)}
               for r in runs)
    assert not any(r.values["criterion.name"] == "rkl" and r.values["objective.kd_weight"] == 0.0 for r in runs)
    assert grid.expand(g)[5].name == runs[5].name  # deterministic
    # overrides: axis values then run.output_dir, parsed back by kd-train's parser
    assert runs[0].overrides[-1] == f"run.output_dir={tmp_path / 'out' / runs[0].name}"
    assert "criterion.name=fkl" in runs[0].overrides and "train.lr=0.001" in runs[0].overrides
    assert runs[0].output_dir == tmp_path / "out" / runs[0].name
    # default names: label-value joined by '_', unique
    assert runs[0].name == "name-fkl_temperature-1.0_kd_weight-0.5_lr-0.001"
    assert len({r.name for r in runs}) == 8


def test_grid_file_errors(tmp_path):
    (tmp_path / "base.yaml").write_text("schema_version: 1\n")
    cases = [
        (dict(base="base.yaml", axis={"a.b": [1]}), "unknown key 'axis'. Did you mean 'axes'?"),
        (dict(base="missing.yaml", axes={"a.b": [1]}), "base config not found"),
        (dict(base="base.yaml", axes={"a.b": 1}), "axes.a.b: expected a non-empty list"),
        (dict(base="base.yaml", axes={"a.b": [1, 2], "c.d": [1]}, zip=[["a.b", "c.d"]]), "equal lengths"),
        (dict(base="base.yaml", axes={"a.b": [1, 2]}, zip=[["a.x"]]), "'a.x' is not an axis"),
        (dict(base="base.yaml", axes={"a.b": [1, 2]}, exclude=[{"a.b": 3}]), "a.b=3 is not one of the axis values"),
        (dict(base="base.yaml", axes={"run.output_dir": ["x"]}), "is set by the grid"),
        (dict(base="base.yaml", axes={"a.b": [1]}, exclude=[{"a.b": 1}]), "every run is excluded"),
    ]
    for i, (content, message) in enumerate(cases):
        path = write_grid(tmp_path / f"g{i}.yaml", **content)
        with pytest.raises(grid.GridError, match=message.replace("(", r"\(").replace(".", r"\.").replace("?", r"\?")):
            grid.expand(grid.load_grid(path))


def test_name_template_fields_and_collision(tmp_path, capsys):
    (tmp_path / "base.yaml").write_text("schema_version: 1\n")
    axes = {"criterion.name": ["fkl", "rkl"], "aligner.name": ["identity"], "criterion.temperature": [1.0, 2.0]}
    g = grid.load_grid(write_grid(tmp_path / "g.yaml", base="base.yaml", axes=axes,
                                  name="{criterion_name}-{aligner_name}-T{temperature:g}"))
    assert [r.name for r in grid.expand(g)] == ["fkl-identity-T1", "fkl-identity-T2", "rkl-identity-T1", "rkl-identity-T2"]

    g.name = "{name}-T{temperature}"  # 'name' is the last component of two axes
    with pytest.raises(grid.GridError, match=r"\{name\} is ambiguous; use one of \{criterion_name\}, \{aligner_name\}"):
        grid.expand(g)
    g.name = "{temprature}"
    with pytest.raises(grid.GridError, match="unknown field .*Did you mean 'temperature'"):
        grid.expand(g)
    g.name = "{criterion_name}"  # collides: two temperatures per criterion
    with pytest.raises(grid.GridError, match=r"gives 2 runs the name 'fkl'.*add the axes that differ"):
        grid.expand(g)

    path = write_grid(tmp_path / "c.yaml", base="base.yaml", axes=axes, name="{criterion_name}")
    assert cli.main([str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("grid: error:") and "the name 'fkl'" in err and "Traceback" not in err


def test_names_are_directory_safe(tmp_path):
    (tmp_path / "base.yaml").write_text("schema_version: 1\n")
    g = grid.load_grid(write_grid(tmp_path / "g.yaml", base="base.yaml", axes={"task.data_dir": ["a/b c", "d"]},
                                  name="{data_dir}"))
    assert [r.name for r in grid.expand(g)] == ["a_b_c", "d"]


def test_format_value_round_trips():
    from kdcore.config import parse_override

    for value in ["fkl", "yes", "1e-3", "", "a: b", 0.5, 1e-05, 0, True, None, [0.9, 0.99], {"name": "fkl", "temperature": 2.0}]:
        text = grid.format_value(value)
        _, parsed = parse_override(f"k={text}")
        assert parsed == value and type(parsed) is type(value), (value, text)


def test_shipped_tiny_grid_expands():
    g = grid.load_grid(REPO / "configs" / "grids" / "tiny-ci.yaml")
    runs = grid.expand(g)
    assert [r.name for r in runs] == ["fkl-a0.5", "fkl-a0.0", "rkl-a0.5"]
    assert g.output_root == Path("runs/grids/tiny-ci")
    assert g.base == Path("configs/tiny/grid-base.yaml") or g.base == REPO / "configs" / "tiny" / "grid-base.yaml"


def test_shipped_gpt2_divergence_grid(monkeypatch):
    import kdcore

    monkeypatch.chdir(REPO)
    path = Path("configs/grids/gpt2-divergences.yaml")
    g = grid.load_grid(path, check_base=False)
    runs = grid.expand(g)
    assert len(runs) == 12
    assert {r.values["criterion.name"] for r in runs} == {"fkl", "rkl", "jsd", "skl", "srkl", "akl"}
    assert {r.values["projector"] for r in runs} == {"none", "dual"}
    assert runs[0].name == "none-fkl" and runs[1].name == "dual-fkl"
    assert g.base == Path("configs/gpt2/vanilla-kd-fkl.yaml")
    if not g.base.is_file():
        pytest.skip("configs/gpt2/vanilla-kd-fkl.yaml is not written yet")
    if "dual" not in kdcore.names("projector"):
        pytest.skip("the 'dual' projector is not registered yet")
    extra = []
    if not Path("data/dolly/train.jsonl").is_file():  # the DSKD data is downloaded separately
        extra = ["task.files={train: data/kdcore-instruct/train.jsonl, valid: data/kdcore-instruct/valid.jsonl, "
                 "test: data/kdcore-instruct/test.jsonl}"]
    g = grid.load_grid(path)
    grid.validate_runs(g, grid.expand(g, extra))


def test_run_state_follows_the_checkpoint_listing(tmp_path):
    """resume iff kdcore.checkpoint lists a complete checkpoint (what makes kd-train refuse to
    start over); a step directory without state.json (a crash mid-write) is a new run."""
    out = tmp_path / "run"
    run = grid.Run(index=0, name="run", values={"a.b": 1}, overrides=[], output_dir=out)
    assert grid.run_state(run) == "new"
    step = out / "checkpoints" / "step_000010"
    step.mkdir(parents=True)
    (out / "checkpoints" / "step_x").mkdir()
    assert grid.run_state(run) == "new"
    (step / "state.json").write_text('{"step": 10}')
    assert grid.run_state(run) == "resume"
    from kdcore.checkpoint import run_checkpoints

    assert run_checkpoints(out) == [step]
    (out / "final").mkdir()
    (out / "final" / "config.json").write_text("{}")
    assert grid.run_state(run) == "finished"


# ---------------------------------------------------------------------------------------------
# validation, dry run, emitted commands, scheduling (tiny models, fake kd-train)
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_grid(make_config, tmp_path):
    """A grid over a tiny-model base config: 2 criteria x 2 kd weights, minus rkl&0.0 = 3 runs."""
    base = make_config()

    def make(**extra):
        content = dict(base=str(base), axes={"criterion.name": ["fkl", "rkl"], "objective.kd_weight": [0.5, 0.0]},
                       exclude=[{"criterion.name": "rkl", "objective.kd_weight": 0.0}], name="{name}-a{kd_weight}",
                       output_root=str(tmp_path / "grid-out"))
        content.update(extra)
        return write_grid(tmp_path / "grid.yaml", **content)

    return make


def test_invalid_run_fails_the_grid_before_launch(tiny_grid, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(grid_launch, "_popen", no_launch)
    path = tiny_grid(axes={"criterion.name": ["fkl", "rkl"], "criterion.temprature": [1.0]}, exclude=[],
                     name="{name}")
    assert cli.main([str(path), "--local"]) == 2
    err = capsys.readouterr().err
    assert "run 'fkl' is invalid" in err and "temprature" in err and "Did you mean 'temperature'" in err
    assert "Traceback" not in err
    assert not (tmp_path / "grid-out").exists()

    # the second run only: an unknown criterion name (registry) fails the whole grid, nothing launched
    path = tiny_grid(axes={"criterion.name": ["fkl", "fkll"]}, exclude=[], name="{name}")
    assert cli.main([str(path), "--parallel", "2"]) == 2
    err = capsys.readouterr().err
    assert "run 'fkll' is invalid" in err and "Traceback" not in err
    assert not (tmp_path / "grid-out").exists()

    # a model check (--validate's validate_models): a missing student directory
    path = tiny_grid(axes={"student.path": [str(tmp_path / "nope")]}, exclude=[], name="s")
    assert cli.main([str(path), "--emit-commands"]) == 2
    captured = capsys.readouterr()
    assert "run 's' is invalid" in captured.err and "model directory not found" in captured.err
    assert captured.out == ""


def test_dry_run_prints_the_table_and_writes_nothing(tiny_grid, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(grid_launch, "_popen", no_launch)
    assert cli.main([str(tiny_grid()), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "3 runs validated" in out
    lines = out.strip().splitlines()
    header = lines.index(next(ln for ln in lines if ln.startswith("#")))
    assert lines[header].split() == ["#", "run", "criterion.name", "objective.kd_weight", "state"]
    assert [ln.split() for ln in lines[header + 1:]] == [["0", "fkl-a0.5", "fkl", "0.5", "new"],
                                                          ["1", "fkl-a0.0", "fkl", "0.0", "new"],
                                                          ["2", "rkl-a0.5", "rkl", "0.5", "new"]]
    assert not (tmp_path / "grid-out").exists()


def test_emit_commands(tiny_grid, tmp_path, monkeypatch, capsys, tiny_dir):
    monkeypatch.setattr(grid_launch, "_popen", no_launch)
    path = tiny_grid()
    assert cli.main([str(path), "--emit-commands", "--nproc-per-node", "2", "--set", "train.lr=0.002"]) == 0
    captured = capsys.readouterr()
    commands = captured.out.strip().splitlines()
    assert len(commands) == 3 and "3 runs validated" in captured.err
    argv = shlex.split(commands[1])
    assert argv[:7] == ["torchrun", "--nproc_per_node", "2", "-m", "kdcore.cli", "--config", str(tmp_path / "config.yaml")]
    out = tmp_path / "grid-out" / "fkl-a0.0"
    assert argv[7:] == ["train.lr=0.002", "criterion.name=fkl", "objective.kd_weight=0.0", f"run.output_dir={out}"]
    # each emitted run has its directory, resolved config and manifest line
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["objective"]["kd_weight"] == 0.0 and cfg["train"]["lr"] == 0.002 and cfg["run"]["output_dir"] == str(out)
    manifest = [json.loads(ln) for ln in (tmp_path / "grid-out" / "manifest.jsonl").read_text().splitlines()]
    assert [m["name"] for m in manifest] == ["fkl-a0.5", "fkl-a0.0", "rkl-a0.5"]
    import hashlib

    assert manifest[1]["config_sha256"] == hashlib.sha256((out / "config.yaml").read_bytes()).hexdigest()
    assert manifest[1]["overrides"] == argv[7:] and manifest[1]["id"] and manifest[1]["action"] == "emit"
    # the commands are what kd-train accepts
    from kdcore.config import load_config

    assert load_config(argv[6], argv[7:]).resolved == cfg

    # finished runs are left out; interrupted ones get train.resume=true
    (tmp_path / "grid-out" / "fkl-a0.5" / "final").mkdir(parents=True)
    (tmp_path / "grid-out" / "fkl-a0.5" / "final" / "config.json").write_text("{}")
    ckpt = tmp_path / "grid-out" / "rkl-a0.5" / "checkpoints" / "step_000001"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text('{"step": 1}')  # complete, as kdcore.checkpoint writes it
    assert cli.main([str(path), "--emit-commands"]) == 0
    captured = capsys.readouterr()
    commands = captured.out.strip().splitlines()
    assert len(commands) == 2 and "# skip fkl-a0.5: finished" in captured.err
    assert commands[1].endswith("train.resume=true") and "rkl-a0.5" in commands[1]
    assert not commands[0].endswith("train.resume=true")


def test_parallel_runs_all_and_reports_failures(tiny_grid, tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(grid_launch, "_popen", fake_popen(calls, fail={"fkl-a0.0"}))
    monkeypatch.setattr(grid_launch, "_gpus", lambda: [])
    path = tiny_grid()
    assert cli.main([str(path), "--parallel", "2"]) == 1  # one failed, the others ran
    out = capsys.readouterr().out
    assert len(calls) == 3 and all(c[1:4] == ["-m", "kdcore.cli", "--config"] for c in calls)
    assert "FAILED fkl-a0.0 (exit status 1" in out and "grid: 2 of 3 launched runs succeeded" in out
    assert "failed: fkl-a0.0" in out
    assert "fake run" in (tmp_path / "grid-out" / "rkl-a0.5" / "grid.log").read_text()

    # GPUs: each run gets one through CUDA_VISIBLE_DEVICES
    envs = []

    def record(argv, **kwargs):
        envs.append(kwargs["env"].get("CUDA_VISIBLE_DEVICES"))
        return fake_popen([])(argv, **kwargs)

    shutil.rmtree(tmp_path / "grid-out")
    monkeypatch.setattr(grid_launch, "_popen", record)
    monkeypatch.setattr(grid_launch, "_gpus", lambda: ["3", "5"])
    assert cli.main([str(path), "--parallel", "2"]) == 0
    assert sorted(envs[:2]) == ["3", "5"] and envs[2] in ("3", "5")
    capsys.readouterr()


def test_report_collects_metrics_and_kd_eval_results(tiny_grid, tmp_path, capsys):
    path = tiny_grid()
    root = tmp_path / "grid-out"
    records = {"fkl-a0.5": [{"split": "eval", "step": 1, "ce": 9.0, "kd_student": 2.0, "loss": 5.5, "tokens": 100},
                            {"split": "train", "step": 2, "ce": 3.0, "loss": 3.0},
                            {"split": "eval", "step": 2, "ce": 4.0, "kd_student": 1.0, "loss": 2.5, "tokens": 100}],
               "fkl-a0.0": [{"split": "eval", "step": 2, "ce": 5.0, "loss": 5.0, "tokens": 100}]}
    for name, recs in records.items():
        (root / name / "final").mkdir(parents=True)
        (root / name / "final" / "config.json").write_text("{}")
        (root / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"split": "ev')
    # kd-eval's results.json (kd-eval --model <out>/final ... --out <out>/eval), and a bare "average"
    (root / "fkl-a0.5" / "eval").mkdir()
    row = {"model": str(root / "fkl-a0.5" / "final"),
           "sets": {"dolly": {"n": 500, "per_seed": {"10": 20.0}, "mean": 20.0, "std": None},
                    "selfinst": {"n": 242, "per_seed": {"10": 23.0}, "mean": 23.0, "std": None}},
           "avg": {"per_seed": {"10": 21.5}, "mean": 21.5, "std": None}}
    other = {"model": "elsewhere/final", "sets": {}, "avg": {"mean": 99.0}}
    (root / "fkl-a0.5" / "eval" / "results.json").write_text(json.dumps({"metric": "rougeL", "models": [other, row]}))
    (root / "fkl-a0.0" / "eval").mkdir()
    (root / "fkl-a0.0" / "eval" / "results.json").write_text(json.dumps({"average": 12.5}))
    (root / "rkl-a0.5" / "eval").mkdir(parents=True)
    (root / "rkl-a0.5" / "eval" / "results.json").write_text("not json")

    assert cli.main([str(path), "--report", "--metric", "rouge_l"]) == 0
    with open(root / "report.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["run", "criterion.name", "objective.kd_weight", "status", "step",
                             "eval_ce", "eval_kd_student", "eval_loss", "rouge_l", "rouge_l_dolly", "rouge_l_selfinst"]
    assert [r["run"] for r in rows] == ["fkl-a0.5", "fkl-a0.0", "rkl-a0.5"]
    assert rows[0]["eval_ce"] == "4.0" and rows[0]["step"] == "2" and rows[0]["rouge_l"] == "21.5"
    assert rows[0]["rouge_l_selfinst"] == "23.0" and rows[0]["status"] == "finished"
    assert rows[1]["eval_kd_student"] == "" and rows[1]["rouge_l"] == "12.5" and rows[1]["objective.kd_weight"] == "0.0"
    assert rows[2]["status"] == "incomplete" and rows[2]["eval_ce"] == "" and rows[2]["rouge_l"] == ""
    md = (root / "report.md").read_text().splitlines()
    assert md[2] == "| " + " | ".join(rows[0]) + " |"
    assert md[5] == "| fkl-a0.0 | fkl | 0.0 | finished | 2 | 5 | - | 5 | 12.5 | - | - |"
    png = (root / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert list((root / "tb_hparams").rglob("events.out.tfevents.*"))
    capsys.readouterr()


# ---------------------------------------------------------------------------------------------
# the shipped CI grid, end to end with kd-train
# ---------------------------------------------------------------------------------------------
def test_ci_grid_end_to_end(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    root = tmp_path / "ci"
    argv = ["configs/grids/tiny-ci.yaml", "--output-root", str(root),
            "--set", f"teacher.path={tiny_dir / 'teacher'}", "--set", f"student.path={tiny_dir / 'student'}"]
    launched = []
    real_popen = grid_launch._popen

    def spy(cmd, **kwargs):
        launched.append(list(cmd))
        return real_popen(cmd, **kwargs)

    monkeypatch.setattr(grid_launch, "_popen", spy)
    assert cli.main(argv + ["--local"]) == 0
    out = capsys.readouterr().out
    names = ["fkl-a0.5", "fkl-a0.0", "rkl-a0.5"]
    assert len(launched) == 3 and "grid: 3 of 3 launched runs succeeded" in out
    for name in names:
        run = root / name
        assert (run / "final" / "config.json").is_file() and (run / "grid.log").is_file()
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert cfg["run"]["output_dir"] == str(run) and cfg["student"]["path"] == str(tiny_dir / "student")
    assert yaml.safe_load((root / "rkl-a0.5" / "config.yaml").read_text())["criterion"]["name"] == "rkl"
    assert len((root / "manifest.jsonl").read_text().splitlines()) == 3

    # re-running launches nothing
    monkeypatch.setattr(grid_launch, "_popen", no_launch)
    assert cli.main(argv + ["--local"]) == 0
    assert "all 3 runs are finished; nothing to launch" in capsys.readouterr().out

    # an interrupted run (checkpoints kept, final/ gone) resumes with train.resume=true; the others are skipped
    shutil.rmtree(root / "rkl-a0.5" / "final")
    assert list((root / "rkl-a0.5" / "checkpoints").glob("step_*"))
    launched.clear()
    monkeypatch.setattr(grid_launch, "_popen", spy)
    assert cli.main(argv + ["--local"]) == 0
    out = capsys.readouterr().out
    assert len(launched) == 1 and launched[0][-1] == "train.resume=true" and f"run.output_dir={root / 'rkl-a0.5'}" in launched[0]
    assert "resumed from" in out and (root / "rkl-a0.5" / "final" / "config.json").is_file()
    assert json.loads((root / "manifest.jsonl").read_text().splitlines()[-1])["action"] == "resume"

    # report: CSV columns = axes + metrics, Markdown table, PNG, TensorBoard hparams
    assert cli.main(argv + ["--report"]) == 0
    capsys.readouterr()
    with open(root / "report.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["run"] for r in rows] == names
    cols = list(rows[0])
    assert cols[:5] == ["run", "criterion.name", "objective.kd_weight", "status", "step"]
    assert {"eval_ce", "eval_loss"} <= set(cols)
    assert all(r["status"] == "finished" and float(r["eval_ce"]) > 0 for r in rows)
    assert rows[0]["eval_kd_student"] and not rows[1]["eval_kd_student"]  # kd_weight 0: no KD term
    md = (root / "report.md").read_text().splitlines()
    assert md[2].startswith("| run | criterion.name | objective.kd_weight | status | step | eval_ce")
    assert len([ln for ln in md if ln.startswith("| fkl-") or ln.startswith("| rkl-")]) == 3
    assert (root / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((root / "tb_hparams").rglob("events.out.tfevents.*"))) >= 3


def test_cli_errors_are_one_line_without_traceback(tmp_path, capsys):
    bad = write_grid(tmp_path / "bad.yaml", base="nowhere.yaml", axes={"a.b": [1]})
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "grid.py"), str(bad), "--dry-run"], capture_output=True,
                          text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == f"grid: error: {bad}: base config not found: {tmp_path / 'nowhere.yaml'}\n"
    for args, message in (([str(tmp_path / "missing.yaml"), "--local"], "grid file not found"),
                          ([str(bad)], "choose what to do"),
                          ([str(bad), "--parallel", "0"], "N must be >= 1")):
        assert cli.main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("grid: error:") and message in err and len(err.strip().splitlines()) == 1


def test_emit_commands_multi_node(tiny_grid, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(grid_launch, "_popen", no_launch)
    path = tiny_grid()
    assert cli.main([str(path), "--emit-commands", "--nnodes", "2"]) == 2  # no rendezvous endpoint
    assert "--rdzv-endpoint" in capsys.readouterr().err
    assert cli.main([str(path), "--emit-commands", "--nnodes", "2", "--nproc-per-node", "8", "--rdzv-endpoint",
                     "node01:29500", "--set", "train.strategy=fsdp"]) == 0
    commands = [shlex.split(c) for c in capsys.readouterr().out.strip().splitlines()]
    manifest = [json.loads(ln) for ln in (tmp_path / "grid-out" / "manifest.jsonl").read_text().splitlines()]
    assert len(commands) == 3
    for argv, record in zip(commands, manifest):
        assert argv[:12] == ["torchrun", "--nnodes", "2", "--rdzv_backend", "c10d", "--rdzv_endpoint", "node01:29500",
                             "--rdzv_id", record["id"], "--nproc_per_node", "8", "-m"]
        assert "train.strategy=fsdp" in argv
    assert len({argv[8] for argv in commands}) == 3  # one rendezvous per run
