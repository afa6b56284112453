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
import yaml

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

@pytest.mark.parametrize("layout", [("2", "1"), ("1", "2")], ids=["micro2", "accum2"])
def test_two_process_fsdp_matches_one_process(make_config, tmp_path, layout):
    """The same global batch of 4: 2 fsdp ranks (micro x accum per rank) vs one plain process
    accumulating 2 x 2; gradients (before) and parameters (after one AdamW step) agree."""
    micro, accum = layout
    path = make_config({"train": {"clip_grad": 0.2}})  # a clip that binds: clipping across shards is tested
    spawn([sys.executable, str(HERE / "ddp_worker.py"), str(path), str(tmp_path / "fsdp.pt"),
           "train.strategy=fsdp", f"train.micro_batch_size={micro}", f"train.grad_accum={accum}"])
    fsdp = torch.load(tmp_path / "fsdp.pt", weights_only=True)
    single = in_process(path, "train.micro_batch_size=2", "train.grad_accum=2")
    single.accumulate(single.data.micro_batches(0))
    grads = {n: p.grad.detach().clone() for n, p in single.module.named_parameters() if p.grad is not None}
    norm = single.optimizer_step()
    assert norm > 0.2  # the clip was active
    assert_close_dicts(grads, fsdp["grads"], rtol=1e-4, atol=1e-6)
    assert_close_dicts({n: p.detach() for n, p in single.module.named_parameters()}, fsdp["params"],
                       rtol=0, atol=1e-5)
