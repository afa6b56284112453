"""train.strategy fsdp (kdcore.sharding): 2 gloo processes match one process, checkpoints resume
across world sizes, exports are whole, and a real torchrun launch trains end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdcore.config import load_config
from kdcore.distributed import DistInfo, shutdown
from kdcore.errors import CheckpointError, ConfigError
from kdcore.trainer import Trainer

HERE = Path(__file__).parent
REPO = HERE.parent


def free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def spawn(argv, world: int = 2, timeout: int = 300):
    """Run ``argv`` as ``world`` ranks with torchrun's environment variables; return outputs."""
    port, procs = free_port(), []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0, out
        outs.append(out)
    return outs


def in_process(path, *overrides) -> Trainer:
    return Trainer(load_config(path, list(overrides)), DistInfo())


@pytest.fixture
def one_process_group():
    """fsdp in this process builds a single-rank process group: destroy it after the test."""
    yield
    shutdown()


def assert_close_dicts(a, b, **tol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=lambda m: f"{k}: {m}", **tol)


# ---------------------------------------------------------------------------------- one step

LORA_CHECKPOINTED = {"student": {"tuner": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
                                  "gradient_checkpointing": True}, "train": {"clip_grad": 0.005}}


@pytest.mark.parametrize("layout,extra", [(("2", "1"), {}), (("1", "2"), {}), (("2", "1"), LORA_CHECKPOINTED)],
                         ids=["micro2", "accum2", "lora-activation-checkpointing"])
def test_two_process_fsdp_matches_one_process(make_config, tmp_path, layout, extra):
    """The same global batch of 4: 2 fsdp ranks (micro x accum per rank) vs one plain process
    accumulating 2 x 2; gradients (before) and parameters (after one AdamW step) agree. Also
    with LoRA adapters (frozen and trainable parameters in one FSDP unit) and activation
    checkpointing (layers recomputed, and all-gathered again, in backward)."""
    micro, accum = layout
    path = make_config({"train": {"clip_grad": 0.2}, **extra})  # a clip that binds: clipping across shards
    clip = load_config(path).train.clip_grad
    spawn([sys.executable, str(HERE / "ddp_worker.py"), str(path), str(tmp_path / "fsdp.pt"),
           "train.strategy=fsdp", f"train.micro_batch_size={micro}", f"train.grad_accum={accum}"])
    fsdp = torch.load(tmp_path / "fsdp.pt", weights_only=True)
    single = in_process(path, "train.micro_batch_size=2", "train.grad_accum=2")
    single.accumulate(single.data.micro_batches(0))
    grads = {n: p.grad.detach().clone() for n, p in single.module.named_parameters() if p.grad is not None}
    norm = single.optimizer_step()
    assert norm > clip  # the clip was active
    assert len(grads) == len(fsdp["grads"]) < len(fsdp["params"]) if extra else len(grads) == len(fsdp["params"])
    assert_close_dicts(grads, fsdp["grads"], rtol=1e-4, atol=1e-6)
    assert_close_dicts({n: p.detach() for n, p in single.module.named_parameters()}, fsdp["params"],
                       rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------- a run, resumes

# eval: 8 examples in batches of 3 -> 2 batches on rank 0, 1 on rank 1: under fsdp, rank 1 runs a
# discarded padding forward (a sharded forward is a collective; without it the 2-rank runs hang).
RUN = ["train.schedule=constant", "train.save_every=2", "train.keep_last=3", "train.eval_every=2",
       "eval.batch_size=3"]


def final_weights(out: Path):
    from transformers import AutoModelForCausalLM

    return {n: p.detach() for n, p in AutoModelForCausalLM.from_pretrained(out / "final").named_parameters()}


def test_one_process_fsdp_run_checkpoints_and_exports(make_config, tmp_path, one_process_group):
    out = tmp_path / "one"
    trainer = in_process(make_config(), *RUN, "train.strategy=fsdp", "train.max_steps=2", f"run.output_dir={out}",
                         "train.micro_batch_size=2", "train.grad_accum=2")
    trainer.train()
    ckpt = out / "checkpoints" / "step_000002"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["format"] == "dcp" and "dcp/.metadata" in state["files"] and "optimizer_groups.pt" in state["files"]
    assert not (ckpt / "model.pt").exists()
    got = final_weights(out)
    want = {n[len("student."):]: p.full_tensor() for n, p in trainer.module.named_parameters()}
    assert_close_dicts(got, want, rtol=0, atol=0)


def torchrun(config, *overrides, nproc: int = 2, timeout: int = 600) -> str:
    """``torchrun --nproc_per_node N -m kdcore.cli --config ...``: a real launch (rendezvous,
    process group, gloo); returns its output."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            free_port(), "-m", "kdcore.cli", "--config", str(config), *overrides]
    done = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-6000:]
    return done.stdout


@pytest.fixture
def reference(make_config, tmp_path):
    """4 steps in one plain process, global batch 4 (2 x 2): the run the resumed ones must equal."""
    out = tmp_path / "reference"
    in_process(make_config(name="ref.yaml"), *RUN, "train.max_steps=4", f"run.output_dir={out}",
               "train.micro_batch_size=2", "train.grad_accum=2").train()
    return final_weights(out)


def test_resume_two_processes_then_one(make_config, tmp_path, reference, one_process_group):
    """Steps 1-2 on 2 fsdp ranks (micro 2 each), steps 3-4 resumed from the DCP checkpoint in one
    process (accumulating 2 x 2): the same weights as the uninterrupted reference."""
    path, out = make_config(name="cut.yaml"), tmp_path / "cut"
    torchrun(path, *RUN, "train.strategy=fsdp", "train.max_steps=2", f"run.output_dir={out}",
             "train.micro_batch_size=2", "train.grad_accum=1")
    assert json.loads((out / "checkpoints" / "step_000002" / "state.json").read_text())["world_size"] == 2
    resumed = in_process(path, *RUN, "train.strategy=fsdp", "train.max_steps=4", f"run.output_dir={out}",
                         "train.micro_batch_size=2", "train.grad_accum=2", "train.resume=true",
                         "train.resume_allow_changes=true")
    resumed.train()
    assert resumed.step == 4
    assert_close_dicts(final_weights(out), reference, rtol=0, atol=1e-5)


def test_resume_one_process_then_two(make_config, tmp_path, reference, one_process_group):
    path, out = make_config(name="cut.yaml"), tmp_path / "cut"
    in_process(path, *RUN, "train.strategy=fsdp", "train.max_steps=2", f"run.output_dir={out}",
               "train.micro_batch_size=2", "train.grad_accum=2").train()
    shutdown()
    log = torchrun(path, *RUN, "train.strategy=fsdp", "train.max_steps=4", f"run.output_dir={out}",
                   "train.micro_batch_size=2", "train.grad_accum=1", "train.resume=true",
                   "train.resume_allow_changes=true")
    assert "resumed from" in log and "step_000002" in log
    assert_close_dicts(final_weights(out), reference, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------- real launches

def run_in(cwd: Path, *args, **kwargs) -> str:
    here = os.getcwd()
    os.chdir(cwd)
    try:
        return torchrun(*args, **kwargs)
    finally:
        os.chdir(here)


def test_torchrun_ddp_and_fsdp_end_to_end(repo_like_cwd, tmp_path):
    """DSKD-CMA on the cross-tokenizer pair (projector and aligner parameters train) launched by
    ``torchrun --nproc_per_node 2 -m kdcore.cli`` under each strategy: both write every output,
    fsdp checkpoints in the dcp format, and the two trained students agree."""
    config = Path("configs/tiny/cma-dual.yaml")
    outs = {}
    for strategy in ("ddp", "fsdp"):
        out = tmp_path / strategy
        log = run_in(repo_like_cwd, config, f"train.strategy={strategy}", f"run.output_dir={out}",
                     "train.micro_batch_size=2", "train.max_steps=3", "train.threads=1")
        assert "done: 3 steps" in log, log[-3000:]
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3]
        state = json.loads((out / "checkpoints" / "step_000003" / "state.json").read_text())
        assert state["world_size"] == 2 and state["format"] == {"ddp": "torch", "fsdp": "dcp"}[strategy]
        outs[strategy] = records
        assert (out / "final" / "config.json").is_file()
    assert_close_dicts(final_weights(tmp_path / "ddp"), final_weights(tmp_path / "fsdp"), rtol=0, atol=1e-5)
    train = lambda s: [r["loss"] for r in outs[s] if r["split"] == "train"]
    assert train("ddp") == pytest.approx(train("fsdp"), rel=1e-5)


# ---------------------------------------------------------------------------------- bad input

def test_fsdp_refuses_generation_during_training(make_config):
    for override in ("eval.generate=true", "eval.test_split=valid"):
        with pytest.raises(ConfigError, match="train.strategy: fsdp does not generate"):
            load_config(make_config(), ["train.strategy=fsdp", override])


@pytest.fixture
def fsdp_checkpoint(make_config, tmp_path, one_process_group):
    path, out = make_config(), tmp_path / "run"
    in_process(path, *RUN, "train.strategy=fsdp", "train.max_steps=2", "train.micro_batch_size=2").train()
    return path, out, out / "checkpoints" / "step_000002"


def restored(trainer: Trainer) -> Trainer:
    """``trainer`` after restoring its newest checkpoint (what ``train()`` does first)."""
    from kdcore.hooks import RunHooks

    trainer.hooks = RunHooks(trainer.run, trainer.parts.instances())
    assert trainer.maybe_resume()
    return trainer


def resume(path, *overrides):
    return restored(in_process(path, *RUN, "train.strategy=fsdp", "train.max_steps=2", "train.micro_batch_size=2",
                               "train.resume=true", *overrides))


class Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_crafted_dcp_metadata_is_refused_not_run(fsdp_checkpoint, tmp_path, monkeypatch):
    import pickle

    from kdcore.checkpoint import file_digests

    path, out, ckpt = fsdp_checkpoint
    (ckpt / "dcp" / ".metadata").write_bytes(pickle.dumps(Payload()))
    state = json.loads((ckpt / "state.json").read_text())
    state["files"] = file_digests(ckpt)  # an attacker rewrites the checksums too
    (ckpt / "state.json").write_text(json.dumps(state))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="refused: posix.system is not allowed"):
        resume(path)
    assert not (tmp_path / "pwned").exists()


def test_corrupt_dcp_shard_is_one_clear_error(fsdp_checkpoint):
    path, out, ckpt = fsdp_checkpoint
    shard = next((ckpt / "dcp").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"dcp/{shard.name} is corrupt"):
        resume(path)


def test_ddp_checkpoint_is_not_resumed_sharded(make_config, tmp_path, one_process_group):
    path = make_config()
    in_process(path, *RUN, "train.max_steps=2", "train.micro_batch_size=2").train()
    with pytest.raises(CheckpointError, match="written by train.strategy ddp"):
        resume(path, "train.resume_allow_changes=true")
    with pytest.raises(ConfigError, match="train.strategy"):  # without allow_changes: the config change first
        resume(path)


def test_fsdp_checkpoint_resumes_unsharded(fsdp_checkpoint):
    """A dcp checkpoint also loads into a plain (ddp-strategy) module: DCP reads whole tensors."""
    path, out, ckpt = fsdp_checkpoint
    trainer = restored(in_process(path, *RUN, "train.max_steps=2", "train.micro_batch_size=2", "train.resume=true",
                                  "train.resume_allow_changes=true"))
    assert trainer.step == 2
    sharded = resume(path)
    want = {n: p.full_tensor() for n, p in sharded.module.named_parameters()}
    assert_close_dicts({n: p.detach() for n, p in trainer.module.named_parameters()}, want, rtol=0, atol=0)


def test_slurm_example_launches_one_torchrun_per_node(tmp_path, make_config):
    """tools/slurm_example.sh with stand-ins for srun and scontrol: the torchrun line it starts
    rendezvouses on the first node and is a valid kd-train command line."""
    import shlex

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-a17\\ngpu-a18\\n'\n")
    (bin_dir / "srun").write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {tmp_path / 'srun.args'}\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    config = make_config()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "8",
           "SLURM_JOB_NODELIST": "gpu-a[17-18]", "SLURM_JOB_ID": "4242", "SLURM_CPUS_PER_TASK": "64"}
    subprocess.run(["bash", str(REPO / "tools" / "slurm_example.sh"), str(config), "train.lr=2e-4"], env=env,
                   check=True, timeout=60)
    argv = (tmp_path / "srun.args").read_text().splitlines()
    assert argv[:2] == ["--kill-on-bad-exit=1", "torchrun"]
    launch = argv[2:argv.index("-m")]
    assert launch == ["--nnodes", "2", "--nproc_per_node", "8", "--rdzv_backend", "c10d", "--rdzv_endpoint",
                      "gpu-a17:29500", "--rdzv_id", "4242"], shlex.join(argv)
    cli = argv[argv.index("-m") + 1:]
    assert cli[:3] == ["kdcore.cli", "--config", str(config)]
    cfg = load_config(config, cli[3:])
    assert cfg.train.strategy == "fsdp" and cfg.train.resume and cfg.train.lr == 2e-4
