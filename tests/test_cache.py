"""Cached teachers (kdcore.teacher_cache, kd-cache): round trip, k = V equals online KD (values and
gradients) for every aligner the cache serves, mismatch errors, resumption, torchrun shards, and a
grid over one cached teacher."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from kdcore import teacher_cache
from kdcore.assemble import build_components
from kdcore.cache_cli import main as kd_cache
from kdcore.config import load_config
from kdcore.data import RunData
from kdcore.distill import DistillModule
from kdcore.distributed import DistInfo
from kdcore.errors import ConfigError
from kdcore.teacher_cache import CacheSettings, TeacherCache, build_cache, sequence_key

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO / "data" / "kdcore-instruct"
CRITERIA = ["fkl", "rkl", "jsd", "skl", "srkl", "tvd", "ce", "akl"]


def build(config, out, *overrides, **settings):
    cfg = load_config(config, list(overrides))
    values = {"k": 8, "temperatures": (2.0,), "dtype": "float32", "shard_size": 16, "splits": ("train", "valid"),
              "batch_size": 4, **settings}
    stop_after = values.pop("stop_after", None)
    return build_cache(cfg, out, CacheSettings(**values), stop_after=stop_after)


def first_batch(parts, cfg):
    data = RunData(parts.task, parts, cfg.train, cfg.eval, cfg.uses_teacher, DistInfo(), cfg.run.seed)
    return data.micro_batches(0)[0]


def loss_and_grads(config, *overrides, like=None):
    """Terms and student gradients of one micro-batch (fused path, as the trainer runs it).
    ``like``: a list holding a DistillModule whose projector and aligner parameters are copied
    (so two runs start from the same projections); the module built here is appended."""
    cfg = load_config(config, list(overrides))
    parts = build_components(cfg)
    module = DistillModule.for_run(parts, cfg.objective, torch.device("cpu"))
    if like:
        module.projector.load_state_dict(like[0].projector.state_dict())
        module.aligner.load_state_dict(like[0].aligner.state_dict())
    if like is not None:
        like.append(module)
    out = module(first_batch(parts, cfg))
    out.loss.backward()
    # the student's, and the projections' and a trainable aligner's (DSKD, CMA)
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return out.terms, grads


def assert_same(online, cached, rtol=2e-5, atol=2e-6, grad_rtol=1e-4, grad_atol=1e-6):
    (t_on, g_on), (t_ca, g_ca) = online, cached
    assert set(t_on) == set(t_ca)
    for name in t_on:
        torch.testing.assert_close(t_ca[name], t_on[name], rtol=rtol, atol=atol, msg=name)
    assert set(g_on) == set(g_ca) and g_on
    for name in g_on:
        torch.testing.assert_close(g_ca[name], g_on[name], rtol=grad_rtol, atol=grad_atol, msg=name)


@pytest.fixture
def same_config(make_config):
    return make_config({"task": {"max_examples": 24}})


# ---------------------------------------------------------------------------------------------
# the file format
# ---------------------------------------------------------------------------------------------
def test_round_trip_matches_the_teacher(same_config, tmp_path, tiny_dir):
    out = build(same_config, tmp_path / "c", k=8, temperatures=(1.0, 2.0), dtype="float32")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["k"] == 8 and manifest["temperatures"] == [1.0, 2.0]
    assert manifest["hidden"] is None and not (out / "teacher_tables.safetensors").exists()  # projector none
    assert manifest["splits"]["train"]["examples"] == 24 and manifest["splits"]["train"]["shards"] == 2
    assert (out / "tokenizer").is_dir() and (out / "teacher_config" / "config.json").is_file()
    cfg = load_config(same_config)
    parts = build_components(cfg)
    batch = first_batch(parts, cfg)["teacher"]
    cache = TeacherCache(out)
    with torch.no_grad():
        logits = parts.teacher_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for b in range(2):
        n = int(batch["attention_mask"][b].sum())
        key = sequence_key(batch["input_ids"][b, :n].tolist(), batch["labels"][b, :n].tolist())
        resp = batch["labels"][b].ne(-100)
        for ti, t in enumerate((1.0, 2.0)):
            rows = cache.rows(key, ti, 8)
            ids, logp, tail = teacher_cache.unpack(rows)
            want = torch.log_softmax(logits[b][resp].float() / t, -1)
            top = want.topk(8, -1)
            assert torch.equal(ids, top.indices)
            torch.testing.assert_close(logp, top.values, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(tail.exp(), 1 - top.values.exp().sum(-1), rtol=1e-4, atol=1e-5)
        # fewer entries than stored: the rest joins the tail bucket exactly
        ids4, logp4, tail4 = teacher_cache.unpack(cache.rows(key, 1, 4))
        torch.testing.assert_close(torch.logsumexp(torch.cat([logp4, tail4[:, None]], -1), -1),
                                   torch.zeros(len(tail4)), atol=1e-5, rtol=0)
    # float16 storage and int16-coded ids: ~ (2 + 2)·k + 8 bytes per token
    small = build(same_config, tmp_path / "h", k=8, temperatures=(2.0,), dtype="float16")
    shard = load_file(str(small / "train-00000.safetensors"))
    assert shard["ids"].dtype == torch.int16 and shard["logp"].dtype == torch.float16
    bpt = json.loads((small / "manifest.json").read_text())["splits"]["train"]["bytes_per_token"]
    assert 4 * 8 + 8 <= bpt < 4 * 8 + 8 + 60  # plus keys, offsets and the safetensors header


# ---------------------------------------------------------------------------------------------
# k = V is online KD, values and gradients
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("criterion", CRITERIA)
def test_full_k_equals_online_identity(criterion, same_config, tmp_path):
    crit = f"criterion={{name: {criterion}, temperature: 2.0}}"
    out = build(same_config, tmp_path / "c", crit, k=10**6)  # k = V
    online = loss_and_grads(same_config, crit)
    cached = loss_and_grads(same_config, crit, f"teacher.cache={out}")
    assert_same(online, cached)


def test_top_k_kl_is_a_lower_bound_that_grows_with_k(same_config, tmp_path):
    """k < V: the KL of the coarse-grained (k + 1)-bucket distributions is at most the full KL
    (data-processing inequality) and grows with k (a finer partition); CE is untouched."""
    out = build(same_config, tmp_path / "c", k=512)
    t_on, _ = loss_and_grads(same_config)
    kd = []
    for k in (8, 64, 256, 512):
        t_ca, _ = loss_and_grads(same_config, f"teacher.cache={out}", f"teacher.cache_k={k}")
        assert t_ca["ce"] == t_on["ce"]
        kd.append(float(t_ca["kd_student"]))
    assert 0 < kd[0] < kd[1] < kd[2] < kd[3] <= float(t_on["kd_student"]) * (1 + 1e-5)


@pytest.fixture
def cross_config(tiny_pair, tmp_path):
    def make(aligner, criterion="fkl", temperature=2.0, projector="none"):
        cfg = {"schema_version": 1, "run": {"output_dir": str(tmp_path / "run"), "seed": 3},
               "teacher": {"path": str(tiny_pair["teacher"])}, "student": {"path": str(tiny_pair["student"])},
               "task": {"name": "instruction", "data_dir": str(DATA_DIR), "max_length": 96, "max_prompt_length": 64,
                        "max_examples": 16},
               "criterion": {"name": criterion, "temperature": temperature}, "projector": projector, "aligner": aligner,
               "objective": {"kd_weight": 0.5},
               "train": {"max_steps": 2, "micro_batch_size": 4, "eval_at_start": False}, "eval": {"max_examples": 8}}
        path = tmp_path / f"{aligner}-{projector}-{criterion}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path
    return make


@pytest.mark.parametrize("aligner,criterion,temperature", [("mined", "fkl", 2.0), ("mined", "jsd", 1.0),
                                                           ("mined", "srkl", 2.0), ("mined", "tvd", 1.0),
                                                           ("mined", "skl", 2.0), ("mined", "ce", 1.0),
                                                           ("uld", "uld", 1.0), ("uld", "uld", 2.0)])
def test_full_k_equals_online_cross_tokenizer(aligner, criterion, temperature, cross_config, tmp_path):
    config = cross_config(aligner, criterion, temperature)
    out = build(config, tmp_path / "c", k=10**6, temperatures=(temperature,))
    online = loss_and_grads(config)
    cached = loss_and_grads(config, f"teacher.cache={out}")
    assert_same(online, cached)


# ---------------------------------------------------------------------------------------------
# a cache that does not match the config
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def small_cache(same_config, tmp_path):
    return build(same_config, tmp_path / "c", k=8)


@pytest.mark.parametrize("overrides,message", [
    (["task.max_examples=32"], r"train data: 8 of 32 teacher sequences are not in the cache \(task settings that differ: max_examples\)"),
    (["task.max_length=80"], r"train data: .* not in the cache .*max_length"),
    (["teacher.cache_k=16"], r"teacher.cache_k: 16 is more than the cache's k = 8"),
    (["criterion.temperature=4.0"], r"criterion temperature 4.0 is not cached \(the cache has 2.0"),
    (["eval.split=test"], r"eval.split 'test': not in the cache"),
    (["train.precision=bf16"], r"train.precision"),
    (["projector=dual", "aligner=cma"], r"projector 'dual' with aligner 'cma' reads the teacher's hidden states"),
])
def test_mismatch_is_one_clear_error(same_config, small_cache, overrides, message):
    cfg = load_config(same_config, [f"teacher.cache={small_cache}", *overrides])
    with pytest.raises(ConfigError, match=message):
        build_components(cfg, load_weights=False)


def test_other_teacher_and_tokenizer_are_named(same_config, small_cache, tiny_dir, tiny_pair):
    cfg = load_config(same_config, [f"teacher.cache={small_cache}", f"teacher.path={tiny_dir / 'teacher_wide'}"])
    with pytest.raises(ConfigError, match=r"teacher.path: cache '.*/teacher', config '.*/teacher_wide'"):
        build_components(cfg)
    cfg = load_config(same_config, [f"teacher.cache={small_cache}", f"teacher.tokenizer={tiny_pair['teacher']}",
                                    "aligner=mined"])
    with pytest.raises(ConfigError, match=r"teacher tokenizer: the config's .* is not the cache's.*train data"):
        build_components(cfg, load_weights=False)


@pytest.fixture
def teacherless(same_config, tmp_path, tiny_dir):
    """A cache built from a copy of the teacher that is then deleted, and a config
    ``teacher: {cache: DIR}`` without a path."""
    import shutil

    copy = tmp_path / "teacher_copy"
    shutil.copytree(tiny_dir / "teacher", copy)
    cache = build(same_config, tmp_path / "c-copy", f"teacher.path={copy}", k=8)
    shutil.rmtree(copy)
    raw = yaml.safe_load(same_config.read_text())
    raw["teacher"] = {"cache": str(cache)}
    path = tmp_path / "cache-only.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, cache, copy


def test_cache_alone_needs_no_teacher_directory(teacherless):
    """Identity, tokenizer and model config come from the cache: the teacher may be gone."""
    path, cache, copy = teacherless
    cfg = load_config(path)
    assert cfg.teacher.path == str(copy) and cfg.teacher.tokenizer == str(cache / "tokenizer")
    parts = build_components(cfg)
    assert parts.teacher_model is None and parts.teacher_cache is not None


def test_dskd_cache_alone_needs_no_teacher_directory(same_config, tmp_path, tiny_dir):
    """DSKD dual from a cache whose teacher directory is gone: hidden states, head and embeddings
    all come from the cache; one training step runs."""
    import shutil

    copy = tmp_path / "teacher_copy"
    shutil.copytree(tiny_dir / "teacher", copy)
    cache = build(same_config, tmp_path / "c-copy", f"teacher.path={copy}", "projector=dual")
    shutil.rmtree(copy)
    raw = yaml.safe_load(same_config.read_text())
    raw.update(teacher={"cache": str(cache)}, projector="dual")
    path = tmp_path / "dual-cache-only.yaml"
    path.write_text(yaml.safe_dump(raw))
    terms, grads = loss_and_grads(path)
    assert {"ce", "kd_student", "kd_teacher", "t2s_ce"} <= set(terms) and all(torch.isfinite(v) for v in terms.values())
    assert any(name.startswith("projector.s2t") for name in grads)


def test_cli_errors(same_config, small_cache, tmp_path, capsys):
    from kdcore.cli import main as kd_train

    assert kd_train(["--config", str(same_config), f"teacher.cache={small_cache}", "criterion.temperature=3",
                     "--validate"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "criterion temperature 3.0 is not cached" in err[0]
    assert kd_train(["--config", str(same_config), f"teacher.cache={tmp_path / 'nowhere'}", "--validate"]) == 2
    assert "holds no manifest.json" in capsys.readouterr().err
    assert kd_train(["--config", str(same_config), f"student.cache={small_cache}", "--validate"]) == 2
    assert "only the teacher can be cached" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# building: resume, settings, torchrun
# ---------------------------------------------------------------------------------------------
def test_interrupted_build_resumes(same_config, tmp_path, monkeypatch):
    calls = []
    real = teacher_cache.teacher_top_k

    def counting(model, side, *args, **kwargs):
        calls.append(side["input_ids"].shape[0])
        return real(model, side, *args, **kwargs)

    monkeypatch.setattr(teacher_cache, "teacher_top_k", counting)
    out = build(same_config, tmp_path / "cut", stop_after=1)  # 2 train + 2 valid shards of 16 (24 examples each)
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    with pytest.raises(ConfigError, match="is incomplete"):
        TeacherCache(out)
    assert sum(calls) == 16
    first = (out / "train-00000.safetensors").stat().st_mtime_ns
    calls.clear()
    build(same_config, out)
    assert sum(calls) == 24 - 16 + 24  # the rest of train, all of valid; the finished shard is kept
    assert (out / "train-00000.safetensors").stat().st_mtime_ns == first
    assert not list(out.glob(".tmp-*"))
    fresh = build(same_config, tmp_path / "fresh")
    for shard in sorted(fresh.glob("*.safetensors")):
        a, b = load_file(str(shard)), load_file(str(out / shard.name))
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    # the same command again has nothing to do
    calls.clear()
    build(same_config, out)
    assert calls == []
    # other settings are refused unless --overwrite
    with pytest.raises(ConfigError, match=r"built with other settings \(k: cache has 8, now 16"):
        build(same_config, out, k=16)
    assert kd_cache(["--config", str(same_config), "--out", str(out), "--k", "16", "--overwrite", "--dtype", "float32",
                     "--shard-size", "16"]) == 0
    assert TeacherCache(out).k_stored == 16


def test_interrupted_hidden_build_resumes(same_config, tmp_path):
    """Resuming a cache with hidden states: the remaining shards and the tables (written once,
    rebuilt if they were lost) end up identical to an uninterrupted build."""
    out = build(same_config, tmp_path / "cut", "projector=dual", stop_after=1)
    assert (out / "teacher_tables.safetensors").is_file()
    (out / "teacher_tables.safetensors").unlink()
    build(same_config, out, "projector=dual")
    assert json.loads((out / "manifest.json").read_text())["complete"]
    fresh = build(same_config, tmp_path / "fresh", "projector=dual")
    for name in [p.name for p in sorted(fresh.glob("*.safetensors"))]:
        a, b = load_file(str(fresh / name)), load_file(str(out / name))
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), name
    assert "hidden" in load_file(str(out / "valid-00000.safetensors"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_ranks_write_their_shards(same_config, tmp_path):
    port, procs = str(free_port()), []
    args = ["--config", str(same_config), "--out", str(tmp_path / "ddp"), "--k", "8", "--shard-size", "8",
            "--dtype", "float32"]
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "CUDA_VISIBLE_DEVICES": ""}
        procs.append(subprocess.Popen([sys.executable, "-m", "kdcore.cache_cli", *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out
    manifest = json.loads((tmp_path / "ddp" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["splits"]["train"]["shards"] == 3
    single = tmp_path / "single"
    assert kd_cache(args[:3] + [str(single)] + args[4:]) == 0
    for shard in sorted(single.glob("*.safetensors")):
        a, b = load_file(str(shard)), load_file(str(tmp_path / "ddp" / shard.name))
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# training and a grid over one cached teacher
# ---------------------------------------------------------------------------------------------
def test_grid_over_a_cached_teacher(teacherless, tmp_path, capsys):
    """Four kd-train runs (criterion x cache_k) over one cache whose teacher no longer exists."""
    import importlib.util

    base, cache, _ = teacherless
    spec = importlib.util.spec_from_file_location("kdcore_tools_grid_cache", REPO / "tools" / "grid.py")
    grid_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(grid_cli)
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump({"base": str(base), "axes": {"criterion.name": ["fkl", "rkl"],
                                                                      "teacher.cache_k": [4, 8]},
                                         "output_root": str(tmp_path / "grid")}))
    assert grid_cli.main([str(grid_file), "--local"]) == 0
    assert "4 of 4 launched runs succeeded" in capsys.readouterr().out
    kd = {}
    for run in sorted(p for p in (tmp_path / "grid").iterdir() if p.is_dir()):
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert cfg["teacher"]["cache"] == str(cache) and (run / "final" / "config.json").is_file()
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in records if r["split"] == "eval"]
        assert all("time/teacher_forward" not in r for r in records)
        kd[run.name] = evals[-1]["kd_student"]
    assert len(set(kd.values())) == 4  # each criterion and k gives its own KD term


# ---------------------------------------------------------------------------------------------
# DSKD / CMA through cached hidden states
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("projector", ["student_space", "teacher_space", "dual"])
def test_hidden_states_equal_online_dskd(projector, same_config, tmp_path):
    """Identity aligner, same tokenizer: the projector's spaces on the stored fp32 hidden states and
    the stored head equal the online teacher's (values and student gradients)."""
    proj = f"projector={projector}"
    out = build(same_config, tmp_path / "c", proj, hidden_dtype="float32")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["hidden"]["size"] == 48 and manifest["hidden"]["dtype"] == "float32"
    assert manifest["hidden"]["table_shapes"] == {"embed_tokens.weight": [512, 48]}  # the tiny teacher's head is tied
    modules = []
    online = loss_and_grads(same_config, proj, like=modules)
    cached = loss_and_grads(same_config, proj, f"teacher.cache={out}", like=modules)
    assert_same(online, cached, rtol=1e-6, atol=1e-6, grad_rtol=1e-6, grad_atol=1e-6)


@pytest.mark.parametrize("projector", ["dual", "student_space"])
def test_hidden_states_equal_online_cma(projector, cross_config, tmp_path):
    """CMA (different tokenizers): the attention over the stored teacher rows, the stored embedding
    table (pair keys, next-token values) and the stored head give the online terms and gradients."""
    config = cross_config("cma", "fkl", 2.0, projector=projector)
    out = build(config, tmp_path / "c", hidden_dtype="float32")  # stored because the config needs them
    modules = []
    online = loss_and_grads(config, like=modules)
    cached = loss_and_grads(config, f"teacher.cache={out}", like=modules)
    assert any(name.startswith("aligner.") for name in online[1])  # the CMA query is trained through the cache
    assert_same(online, cached, rtol=1e-6, atol=1e-6, grad_rtol=1e-6, grad_atol=1e-6)


def test_bfloat16_hidden_states_are_close(cross_config, tmp_path):
    """The default storage, bfloat16 (8 mantissa bits): terms within bf16 rounding of the online ones."""
    config = cross_config("cma", "fkl", 2.0, projector="dual")
    out = build(config, tmp_path / "c")
    assert load_file(str(out / "train-00000.safetensors"))["hidden"].dtype == torch.bfloat16
    hidden = json.loads((out / "manifest.json").read_text())["hidden"]
    assert hidden["bytes_per_token"] == 2 * hidden["size"] == 2 * 64  # the tiny pair teacher: D = 64
    modules = []
    online = loss_and_grads(config, like=modules)
    cached = loss_and_grads(config, f"teacher.cache={out}", like=modules)
    assert_same(online, cached, rtol=2e-2, atol=1e-3, grad_rtol=5e-2, grad_atol=1e-3)
    assert any(not torch.equal(online[0][n], cached[0][n]) for n in online[0])  # it is rounded, not exact


def test_hidden_states_missing_or_unusable_is_one_clear_error(same_config, small_cache, tmp_path, cross_config):
    cfg = load_config(same_config, [f"teacher.cache={small_cache}", "projector=teacher_space"])
    with pytest.raises(ConfigError, match=r"projector 'teacher_space' with aligner 'identity' reads the teacher's hidden "
                                          r"states.*holds only top-k.*kd-cache --hidden"):
        build_components(cfg, load_weights=False)
    config = cross_config("cma", projector="dual")
    out = build(config, tmp_path / "h", hidden=True)
    cfg = load_config(config, [f"teacher.cache={out}", "aligner.norm=padded"])
    with pytest.raises(ConfigError, match=r"aligner.norm 'padded': a cache holds the teacher's response rows only"):
        build_components(cfg, load_weights=False)
    # a build with other hidden-state settings is refused, not mixed into the old shards
    with pytest.raises(ConfigError, match=r"other settings \(hidden: cache has .*bfloat16.*now .*float32"):
        build(config, out, hidden=True, hidden_dtype="float32")
    # the tables are needed at run time
    (out / "teacher_tables.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"teacher_tables.safetensors is missing"):
        loss_and_grads(config, f"teacher.cache={out}")


@pytest.mark.parametrize("criterion", ["rkl", "akl"])
def test_mined_reverse_kl_is_refused(criterion, cross_config, tmp_path):
    """Online MinED's finite −1e5 fill logit makes reverse-KL terms charge ~1e5/T per unit of student
    mass on tokens without a teacher image; the cache cannot reproduce that, so it refuses."""
    from kdcore.teacher_cache import charges_unmapped_mass
    from kdcore import build as build_component

    config = cross_config("mined", criterion, 2.0)
    out = build(config, tmp_path / "c", k=8, temperatures=(2.0,))
    with pytest.raises(ConfigError, match=rf"criterion '{criterion}' with aligner 'mined': online MinED .* −1e5"):
        build_components(load_config(config, [f"teacher.cache={out}"]), load_weights=False)
    assert not any(charges_unmapped_mass(build_component("criterion", {"name": name, "temperature": 2.0}))
                   for name in ("fkl", "jsd", "skl", "srkl", "tvd", "ce"))


def test_one_hidden_cache_serves_projector_none_and_dskd(same_config, tmp_path, capsys):
    """``kd-cache --hidden`` on a projector-none config: the same cache serves the top-k path and
    DSKD with ``init: pinv`` (prepare reads the cached teacher head, so the projections start equal
    without copying them)."""
    out = tmp_path / "c"
    assert kd_cache(["--config", str(same_config), "--out", str(out), "--k", "600", "--temperatures", "2.0", "--dtype", "float32",
                     "--hidden", "--hidden-dtype", "float32", "--shard-size", "16", "--batch-size", "4"]) == 0
    assert "hidden states float32" in capsys.readouterr().out
    assert_same(loss_and_grads(same_config), loss_and_grads(same_config, f"teacher.cache={out}"))
    dual = "projector={name: dual, init: pinv}"
    assert_same(loss_and_grads(same_config, dual), loss_and_grads(same_config, dual, f"teacher.cache={out}"),
                rtol=1e-6, atol=1e-6, grad_rtol=1e-6, grad_atol=1e-6)


def test_untied_teacher_head_is_stored(make_config, tiny_dir, tmp_path):
    from transformers import AutoTokenizer

    from kdcore.tiny import tiny_causal_lm

    tiny_causal_lm(AutoTokenizer.from_pretrained(str(tiny_dir / "tokenizer")), tmp_path / "untied", hidden=48,
                   layers=2, seed=5, tie=False)
    config = make_config({"task": {"max_examples": 24}, "teacher": {"path": str(tmp_path / "untied")},
                          "projector": "teacher_space"}, name="untied.yaml")
    out = build(config, tmp_path / "c", hidden_dtype="float32")
    shapes = json.loads((out / "manifest.json").read_text())["hidden"]["table_shapes"]
    assert shapes == {"embed_tokens.weight": [512, 48], "lm_head.weight": [512, 48]}
    modules = []
    online = loss_and_grads(config, like=modules)
    cached = loss_and_grads(config, f"teacher.cache={out}", like=modules)
    assert_same(online, cached, rtol=1e-6, atol=1e-6, grad_rtol=1e-6, grad_atol=1e-6)
