"""How the ranks share the work: ``train.strategy: ddp`` (replicas) or ``fsdp`` (FSDP2 sharding).

* ``ddp``: every rank holds the whole student (+ projector + aligner) under
  DistributedDataParallel and the whole frozen teacher; checkpoints are ``model.pt`` and
  ``optimizer.pt`` written by rank 0 (:mod:`kdcore.checkpoint`).
* ``fsdp``: PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``) over a 1-D DeviceMesh of
  all ranks (a single-rank gloo/NCCL group when run by one process). Every parameter is a
  DTensor split on dim 0 (``Shard(0)``), so a rank stores ``1/W`` of the weights, gradients and
  AdamW moments (ZeRO-3).

  - student: rank 0's initial weights broadcast (as DDP does), then one FSDP unit per decoder layer (all-gathered for its forward, resharded after
    it, all-gathered again for its backward); the :class:`~kdcore.distill.DistillModule` is the
    root unit and holds the rest: embeddings, final norm, head, projector and aligner. The KD
    loss reads the student head weight inside the root's forward, where it is unsharded.
  - teacher (frozen, ``torch.no_grad``): one unit per decoder layer, resharded after its
    forward, under a root unit on the backbone (final norm, positions); the input embedding and
    the head are left replicated (``ignored_params``) because the KD loss reads the head weight
    outside any module forward. No gradients, no optimizer state.
  - mixed precision on CUDA with bf16 (``train.precision``): parameters all-gathered and
    computed in bf16, gradients reduce-scattered in fp32 (``MixedPrecisionPolicy``); fp32 on CPU.
  - gradients are reduce-scattered after every micro-batch's backward and averaged over ranks
    (like DDP's all-reduce), so the trainer's scaling ``loss × W / N_global`` still gives the
    token mean of the global batch; the sharded gradients accumulate across micro-batches.
  - clipping: the global norm ``‖g‖ = sqrt(Σ_ranks Σ_shards ‖g_shard‖²)`` is a replicated
    DTensor (:func:`kdcore.optim.total_grad_norm`), so every rank clips by the same factor.
  - activation checkpointing: ``student.gradient_checkpointing`` (recompute every decoder
    layer's activations in backward) works under both strategies.
  - checkpoints: ``torch.distributed.checkpoint`` (DCP) of the sharded model and optimizer
    state (:class:`DcpFiles`); DCP reshards on load, so a run resumes on another world size.
  - ``best/`` and ``final/``: the full student state is gathered to rank 0 (on CPU) and loaded
    into a plain copy of the student that rank 0 saves with ``save_pretrained``.
  - evaluation: an FSDP forward is a collective, so every rank runs as many eval forwards as
    the rank with the most batches (``lockstep``); generation (``eval.generate``,
    ``eval.test_split``), done by rank 0 alone, is refused: evaluate ``final/`` with kd-eval.
"""

from __future__ import annotations

import contextlib
import io
import logging
import pickle
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from .distributed import DistInfo, wrap_ddp
from .errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

DCP_DIR = "dcp"
OPTIMIZER_GROUPS = "optimizer_groups.pt"


def check_strategy(train, eval_cfg) -> None:
    """What ``train.strategy: fsdp`` cannot do (checked with the config, before any weight loads)."""
    if train.strategy != "fsdp":
        return
    if eval_cfg.generate or eval_cfg.test_split:
        raise ConfigError("train.strategy: fsdp does not generate during training (rank 0 would wait for the other "
                          "ranks' shards): set eval.generate: false and eval.test_split: null, and evaluate final/ "
                          "with kd-eval")


# ------------------------------------------------------------------------------------ strategies

class DataParallel:
    """``ddp``: replicas under DistributedDataParallel; checkpoints in the ``torch`` format."""

    name = "ddp"
    lockstep = False  # a replica's forward needs no other rank: ranks may run different eval batch counts

    def __init__(self, info: DistInfo, amp_dtype=None):
        self.info = info
        self.build_device = info.device  # the models move to the device whole
        self.checkpoint_format = None  # kdcore.checkpoint's own TorchFiles

    def wrap(self, module, parts):
        return wrap_ddp(module, self.info)

    def no_sync(self, model, last: bool):
        """DDP all-reduces once per optimizer step: on the last micro-batch."""
        return contextlib.nullcontext() if last or not self.info.enabled else model.no_sync()

    def gatherer(self, model, rebuild: Callable[[], torch.nn.Module]):
        """A callable that returns the model rank 0 saves (a replica is already whole)."""
        return None


class FullyShard:
    """``fsdp``: FSDP2 over a 1-D DeviceMesh (see the module docstring)."""

    name = "fsdp"
    lockstep = True

    def __init__(self, info: DistInfo, amp_dtype=None):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy

        self.info = info
        # The models stay on the CPU until fully_shard moves them unit by unit (a whole layer to
        # the device, then only its shard kept): no GPU ever holds the whole teacher.
        self.build_device = torch.device("cpu")
        if not dist.is_initialized():  # one process: a single-rank group, so the same code path runs
            backend = "nccl" if info.device.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
        self.mesh = init_device_mesh(info.device.type, (info.world_size,), mesh_dim_names=("dp",))
        bf16 = info.device.type == "cuda" and amp_dtype == torch.bfloat16
        self.mp_policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
                          else MixedPrecisionPolicy())
        self.checkpoint_format = DcpFiles()

    def wrap(self, module, parts):
        """Shard the teacher and the student in place; the DistillModule is returned (it is the
        module the trainer calls, the root FSDP unit)."""
        from torch.distributed.fsdp import fully_shard

        from .distill import backbone
        from .models import decoder_layers

        teacher = parts.teacher_model
        if teacher is not None and module.kd_weight > 0:
            for layer in decoder_layers(teacher):
                fully_shard(layer, mesh=self.mesh, mp_policy=self.mp_policy, reshard_after_forward=True)
            heads = (teacher.get_input_embeddings(), teacher.get_output_embeddings())
            for m in heads:  # fully_shard neither shards nor moves ignored parameters
                m.to(self.info.device)
            replicated = {p for m in heads for p in m.parameters()}
            fully_shard(backbone(teacher), mesh=self.mesh, mp_policy=self.mp_policy, ignored_params=replicated)
        self.broadcast_from_rank0(module)
        for layer in decoder_layers(module.student):
            fully_shard(layer, mesh=self.mesh, mp_policy=self.mp_policy, reshard_after_forward=True)
        fully_shard(module, mesh=self.mesh, mp_policy=self.mp_policy)
        return module

    def broadcast_from_rank0(self, module) -> None:
        """Give every rank rank 0's parameters and buffers before sharding. Ranks seed with
        ``seed + rank``, so fresh weights (projector, aligner, LoRA adapters) differ between
        ranks; DDP broadcasts them when it wraps, fully_shard would keep each rank's own slice."""
        if not self.info.enabled:
            return
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                dist.broadcast(t.data, src=0)

    def no_sync(self, model, last: bool):
        """Reduce-scatter after every micro-batch: the accumulated gradients stay sharded (1/W of
        the memory); skipping the sync would keep whole unsharded gradients between micro-batches."""
        return contextlib.nullcontext()

    def gatherer(self, model, rebuild: Callable[[], torch.nn.Module]):
        """A callable, run on every rank (it all-gathers), that returns on rank 0 a plain copy of
        the student (``rebuild()``, without FSDP) holding the gathered weights, ``None`` elsewhere."""

        def gather():
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if not self.info.is_main:
                return None
            devices = [self.info.device] if self.info.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):  # a tuner's fresh adapters must not move the RNG
                plain = rebuild()
            plain.load_state_dict(full)
            return plain

        return gather


def strategy_for(name: str, info: DistInfo, amp_dtype=None):
    return {"ddp": DataParallel, "fsdp": FullyShard}[name](info, amp_dtype)


# ------------------------------------------------------------------------------------ DCP checkpoints

class _MetadataUnpickler(pickle.Unpickler):
    """DCP's ``.metadata`` is a pickle; this reads it without running code: only the classes of
    ``torch.distributed.checkpoint.metadata`` and a few torch/builtin value types may appear."""

    CLASS_MODULES = ("torch.distributed.checkpoint.metadata",)  # dataclasses and enums only
    ALLOWED = {("torch", "Size"), ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
               ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("pathlib", "PosixPath"),
               ("pathlib", "PurePosixPath"), ("torch.serialization", "_get_layout")}  # a layout by its name

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        if module in self.CLASS_MODULES and isinstance(super().find_class(module, name), type):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


def _safe_reader(directory: Path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        """DCP's file reader with ``.metadata`` read by :class:`_MetadataUnpickler` (tensor data
        is read by DCP with ``torch.load(weights_only=True)``)."""

        def read_metadata(self, *args, **kwargs):
            path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(path, "rb") as fh:
                metadata = _MetadataUnpickler(io.BytesIO(fh.read())).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(directory))


class DcpFiles:
    """The ``dcp`` checkpoint format: ``dcp/`` (DCP: the model and optimizer tensors, every rank
    writing its shards, keyed by parameter name) and ``optimizer_groups.pt`` (the optimizer's
    hyperparameters, plain values); scheduler and RNG files as in the ``torch`` format.

    Names, not shard layouts, identify the tensors, so the checkpoint loads into any world size
    (DCP reads the slices each rank's shards need) and into an unsharded module too."""

    name = "dcp"
    files = (f"{DCP_DIR}/.metadata", OPTIMIZER_GROUPS)

    def write(self, directory: Path, module, optimizer, rank: int) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(module, optimizer)
        try:
            dcp.save({"model": model_sd, "optimizer": optim_sd["state"]}, checkpoint_id=str(directory / DCP_DIR))
        except CheckpointException as exc:  # a BaseException: make it a write failure every rank reports
            raise RuntimeError(_first_failure(exc)) from None
        if rank == 0:
            torch.save(optim_sd["param_groups"], directory / OPTIMIZER_GROUPS)

    def read(self, directory: Path, module, optimizer, load: Callable) -> None:
        """Restore into ``module`` and ``optimizer`` (sharded or not); ``load`` is the checked
        ``torch.load(weights_only=True)`` of :mod:`kdcore.checkpoint`."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        reader, metadata = _safe_reader(directory / DCP_DIR), directory / DCP_DIR / ".metadata"
        try:  # read here first, so that a refused or unreadable file is this error, not one DCP wraps
            reader.read_metadata()
        except pickle.UnpicklingError as exc:
            raise CheckpointError(f"{metadata}: refused: {exc} (loading it could run code)") from None
        except Exception as exc:  # truncated, not a pickle at all
            raise CheckpointError(f"{metadata} is corrupt: {type(exc).__name__}") from None
        model_sd, optim_sd = get_state_dict(module, optimizer)  # templates: this run's names and shards
        state = {"model": model_sd, "optimizer": optim_sd["state"]}
        try:
            dcp.load(state, storage_reader=reader)
        except CheckpointException as exc:
            raise CheckpointError(f"checkpoint {directory} is corrupt or does not match this config: "
                                  f"{_first_failure(exc)}") from None
        groups = load(directory / OPTIMIZER_GROUPS)
        set_state_dict(module, optimizer, model_state_dict=state["model"],
                       optim_state_dict={"state": state["optimizer"], "param_groups": groups})


def _first_failure(exc) -> str:
    """The first rank's error of a DCP ``CheckpointException``, on one line."""
    failures = getattr(exc, "failures", None) or {}
    for err in failures.values():
        inner = err[0] if isinstance(err, tuple) else err  # DCP keeps (exception, traceback) per rank
        text = str(inner).splitlines()[0] if str(inner) else type(inner).__name__
        if isinstance(inner, OSError) and inner.strerror:
            text = inner.strerror + (f" ({inner.filename})" if inner.filename else "")
        return text
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
