"""One rank of the DDP/FSDP gradient test: ``python ddp_worker.py CONFIG OUT [overrides]`` under
torchrun-style environment variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

Runs the first global batch through ``Trainer.accumulate`` and one optimizer step, then rank 0
saves the gradients (before the step) and parameters (after it); sharded (fsdp) tensors are
gathered whole first, on every rank.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from kdcore.config import load_config  # noqa: E402
from kdcore.distributed import init_distributed, shutdown  # noqa: E402
from kdcore.trainer import Trainer  # noqa: E402


def whole(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.full_tensor() if hasattr(t, "full_tensor") else t.clone()


def main(config_path: str, out_path: str, *overrides: str) -> None:
    torch.set_num_threads(1)
    info = init_distributed()
    trainer = Trainer(load_config(config_path, list(overrides)), info)
    trainer.accumulate(trainer.data.micro_batches(0))
    grads = {n: whole(p.grad) for n, p in trainer.module.named_parameters() if p.grad is not None}
    trainer.optimizer_step()
    params = {n: whole(p) for n, p in trainer.module.named_parameters()}
    if info.is_main:
        torch.save({"grads": grads, "params": params}, out_path)
    shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
