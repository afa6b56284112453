"""The training loop shared by every method (vanilla KD, DSKD, MinED, ULD, SFT, ...).

One optimizer step = ``grad_accum`` micro-batches on each of ``world_size`` ranks. The loss of
every micro-batch is ``Σ token terms / N_global × world_size``, where ``N_global`` is the number
of student response tokens in the whole global batch (all micro-batches, all ranks): DDP's
gradient averaging then yields exactly the token mean over the global batch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from . import checkpoint as ckpt
from .config import Config, dump
from .data import Collator, GlobalBatchPlan, PairDataset, eval_batches, pad_id, steps_for
from .distill import CE, DistillModule
from .distributed import DistInfo, all_reduce_sum, barrier
from .errors import ConfigError, DataError
from .assemble import Components, build_components, plugin_manifest

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def lr_lambda(schedule: str, warmup: int, total: int, min_ratio: float):
    """Multiplier of a group's base lr at ``step``: linear warmup, then cosine/linear decay to
    ``min_ratio`` (``min_lr / base_lr``) at ``total``, or constant."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
        return min_ratio + (1 - min_ratio) * decay

    return factor


def param_groups(module: DistillModule, lr: float, projector_lr: float, weight_decay: float) -> List[Dict]:
    """Student parameters at ``lr`` (no decay on biases and norm weights, i.e. 1-d tensors),
    projector and aligner parameters at ``projector_lr``."""
    decay, no_decay, extra = [], [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith(("projector.", "aligner.")):
            extra.append(p)
        elif p.dim() < 2:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "lr": lr, "weight_decay": weight_decay},
              {"params": no_decay, "lr": lr, "weight_decay": 0.0}]
    if extra:
        groups.append({"params": extra, "lr": projector_lr, "weight_decay": weight_decay})
    return [g for g in groups if g["params"]]


def move(batch, device):
    """Copy a collated batch (``{part: {name: tensor}}``) to ``device``, keeping shared parts shared."""
    moved = {}
    for part, tensors in batch.items():
        same = next((moved[p] for p in moved if batch[p] is tensors), None)
        moved[part] = same if same is not None else {k: v.to(device, non_blocking=True) for k, v in tensors.items()}
    return moved


class Trainer:
    """Builds everything from a :class:`Config` and runs ``train()``."""

    def __init__(self, config: Config, dist_info: DistInfo, components: Optional[Components] = None):
        self.cfg, self.dist = config, dist_info
        t = config.train
        if t.threads:
            torch.set_num_threads(t.threads)
        self.out = Path(config.run.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self._check_output_dir()
        seed_everything(config.run.seed + dist_info.rank)
        self.parts = components or build_components(config, load_weights=True)
        self.device = dist_info.device
        p = self.parts
        if p.teacher_model is not None:
            p.teacher_model.to(self.device)
            p.projector.prepare(p.student_model, p.teacher_model)
            p.aligner.prepare(p.student_model, p.teacher_model)
        self.module = DistillModule(p.student_model, p.projector, p.aligner, p.criterion,
                                    config.objective.kd_weight, config.objective.chunk_size, p.teacher_model).to(self.device)
        has_extra = any(True for _ in self.module.projector.parameters()) or any(True for _ in self.module.aligner.parameters())
        self.model = (DDP(self.module, find_unused_parameters=has_extra,
                          device_ids=[self.device.index] if self.device.type == "cuda" else None)
                      if dist_info.enabled else self.module)
        self.optimizer = torch.optim.AdamW(param_groups(self.module, t.lr, t.projector_lr, t.weight_decay),
                                           betas=tuple(t.adam_betas))
        self._build_data()
        self.total_steps = t.max_steps or steps_for(len(self.train_set), self.global_batch, t.epochs)
        if self.total_steps < 1:
            raise DataError(f"the train split has {len(self.train_set)} examples, fewer than one global batch "
                            f"of {self.global_batch}; lower train.micro_batch_size or grad_accum")
        lambdas = [lr_lambda(t.schedule, t.warmup_steps, self.total_steps, min(t.min_lr / g["lr"], 1.0))
                   for g in self.optimizer.param_groups]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambdas)
        self.step = 0
        self.best: Optional[Dict] = None
        self.writer = None
        self.amp = self._autocast_dtype()

    # -- set-up helpers ----------------------------------------------------------------
    def _check_output_dir(self) -> None:
        if not self.cfg.train.resume and ckpt.list_checkpoints(self.ckpt_root):
            raise ConfigError(f"run.output_dir {self.out} already holds checkpoints; set train.resume=true to "
                              "continue that run, or choose another run.output_dir")

    def _autocast_dtype(self):
        prec = self.cfg.train.precision
        if prec == "bf16" or (prec == "auto" and self.device.type == "cuda" and torch.cuda.is_bf16_supported()):
            return torch.bfloat16
        return None

    def _build_data(self) -> None:
        p, t, task = self.parts, self.cfg.train, self.parts.task
        teacher_tok = None if p.shared_tokenizer else p.teacher_tokenizer
        features = p.aligner.pair_features if self.cfg.uses_teacher else None
        make = lambda exs: PairDataset(exs, p.student_tokenizer, teacher_tok, task.max_length, task.max_prompt_length, features)
        self.train_set = make(task.examples("train"))
        eval_examples = task.examples(self.cfg.eval.split)
        if self.cfg.eval.max_examples:
            eval_examples = eval_examples[: self.cfg.eval.max_examples]
        self.eval_set = make(eval_examples)
        self.collate = Collator(pad_id(p.student_tokenizer), pad_id(p.teacher_tokenizer) if teacher_tok else None)
        self.global_batch = t.micro_batch_size * t.grad_accum * self.dist.world_size

    def _loader(self, start_step: int):
        t = self.cfg.train
        plan = GlobalBatchPlan(len(self.train_set), t.micro_batch_size, t.grad_accum, self.dist.world_size,
                               self.dist.rank, seed=self.cfg.run.seed, start_step=start_step, max_steps=self.total_steps)
        self.plan = plan
        return torch.utils.data.DataLoader(self.train_set, batch_sampler=plan, collate_fn=self.collate,
                                           num_workers=t.num_workers, persistent_workers=False)

    def micro_batches(self, step: int):
        """This rank's collated micro-batches of global ``step`` (what the loader yields)."""
        plan = GlobalBatchPlan(len(self.train_set), self.cfg.train.micro_batch_size, self.cfg.train.grad_accum,
                               self.dist.world_size, self.dist.rank, seed=self.cfg.run.seed)
        return [self.collate([self.train_set[i] for i in idx]) for idx in plan.micro_batches(step)]

    # -- one optimizer step -------------------------------------------------------------
    def accumulate(self, micro_batches) -> Dict[str, float]:
        """Forward/backward over this rank's micro-batches of one global batch.

        Leaves the summed gradients in ``.grad``; returns the global means of every term.
        """
        tokens = torch.tensor([float(sum(int(mb["student"]["labels"].ne(-100).sum()) for mb in micro_batches))])
        n_global = float(all_reduce_sum(tokens.to(self.device), self.dist).item())
        if n_global == 0:
            raise DataError("a global batch has no response tokens (every response was truncated away); "
                            "raise task.max_length or lower task.max_prompt_length")
        scale = self.dist.world_size / n_global
        sums: Dict[str, torch.Tensor] = {}
        acc: Dict[str, torch.Tensor] = {}
        for i, mb in enumerate(micro_batches):
            mb = move(mb, self.device)
            sync = contextlib.nullcontext() if (i == len(micro_batches) - 1 or not self.dist.enabled) else self.model.no_sync()
            with sync:
                with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                    loss, terms, counts = self.model(mb)
                (loss * scale).backward()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0) + v.float()
            for k, (correct, rows) in counts.items():
                c = acc.setdefault(k, torch.zeros(2, device=self.device))
                c += torch.stack([correct.float(), torch.tensor(float(rows), device=self.device)])
        return self._reduce_metrics(sums, acc, n_global)

    def _reduce_metrics(self, sums, acc, n_global) -> Dict[str, float]:
        keys = sorted(sums)
        akeys = sorted(acc)
        flat = torch.stack([sums[k] for k in keys] + [x for k in akeys for x in acc[k]]) if keys or akeys else torch.zeros(0)
        flat = all_reduce_sum(flat.detach().to(self.device), self.dist).cpu()
        out = {k: flat[i].item() / n_global for i, k in enumerate(keys)}
        for j, k in enumerate(akeys):
            correct, rows = flat[len(keys) + 2 * j].item(), flat[len(keys) + 2 * j + 1].item()
            out[k] = correct / rows if rows else 0.0
        kd_weight = self.cfg.objective.kd_weight
        if CE in out:
            out["loss"] = (1 - kd_weight) * out[CE] + kd_weight * sum(v for k, v in out.items() if k in sums and k != CE)
        out["tokens"] = n_global
        return out

    def optimizer_step(self) -> float:
        params = [p for p in self.module.parameters() if p.requires_grad]
        clip = self.cfg.train.clip_grad
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    # -- evaluation -----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        was_training = self.module.training
        self.module.eval()
        sums: Dict[str, torch.Tensor] = {}
        acc: Dict[str, torch.Tensor] = {}
        tokens = torch.zeros(1, device=self.device)
        for idx in eval_batches(len(self.eval_set), self.cfg.eval.batch_size, self.dist.world_size, self.dist.rank):
            mb = move(self.collate([self.eval_set[i] for i in idx]), self.device)
            tokens += mb["student"]["labels"].ne(-100).sum()
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                _, terms, counts = self.module(mb)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0) + v.float()
            for k, (correct, rows) in counts.items():
                c = acc.setdefault(k, torch.zeros(2, device=self.device))
                c += torch.stack([correct.float(), torch.tensor(float(rows), device=self.device)])
        n = float(all_reduce_sum(tokens, self.dist).item())
        metrics = self._reduce_metrics(sums, acc, max(n, 1.0))
        if self.cfg.eval.generate:
            metrics["rouge_l"] = self.dev_rouge_l()
        if was_training:
            self.module.train()
        return metrics

    def dev_rouge_l(self) -> float:
        """Dev ROUGE-L of the student's responses on the eval split."""
        return self.rouge_l(self.parts.student_model, self.parts.student_tokenizer, self.eval_set.examples)

    def rouge_l(self, model, tokenizer, examples, ngram_block: int = 0) -> float:
        """ROUGE-L (× 100) of ``model``'s generations, averaged over ``eval.seeds``: DSKD's dev
        sampler (no n-gram block by default; the test protocol blocks 6-grams) or greedy
        decoding. Rank 0 generates and shares the value; a forked RNG keeps evaluation from
        changing the training random stream."""
        from .evaluate import rouge_l_of
        from .generate import GenerationSettings

        e, task = self.cfg.eval, self.parts.task
        value = torch.zeros(1, device=self.device)
        if self.dist.is_main:
            settings = GenerationSettings.dev(task.max_length, task.max_prompt_length, batch_size=e.generate_batch_size,
                                              do_sample=not e.greedy, no_repeat_ngram_size=ngram_block)
            if e.max_new_tokens:
                settings = settings.replace(max_new_tokens=e.max_new_tokens)
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                value += rouge_l_of(model, tokenizer, examples, settings, seeds=e.seeds[:1] if e.greedy else e.seeds)
        return float(all_reduce_sum(value, self.dist).item())

    def test_rouge_l(self, stage: str) -> None:
        """``eval.test_split``: student ROUGE-L ``before``/``after`` training (and the teacher's,
        once), logged as split ``test`` and kept in ``test_rouge.json``."""
        split = self.cfg.eval.test_split
        if not split:
            return
        examples = self.parts.task.examples(split)
        if self.dist.is_main:
            who = "student and teacher" if stage == "before" and self.parts.teacher_model is not None else "student"
            log.info("ROUGE-L of the %s on the %s split (%d examples), %s training", who, split, len(examples), stage)
        path = self.out / "test_rouge.json"
        results = json.loads(path.read_text()) if path.is_file() else {"split": split}
        results[f"student_{stage}"] = self.rouge_l(self.parts.student_model, self.parts.student_tokenizer, examples, 6)
        if stage == "before" and self.parts.teacher_model is not None:
            results["teacher"] = self.rouge_l(self.parts.teacher_model, self.parts.teacher_tokenizer, examples, 6)
        if self.dist.is_main:
            path.write_text(json.dumps(results, indent=2))
        self.log("test", {k: v for k, v in results.items() if k != "split"})

    # -- logging ------------------------------------------------------------------------------
    def log(self, split: str, metrics: Dict[str, float]) -> None:
        if not self.dist.is_main:
            return
        record = {"split": split, "step": self.step, **metrics}
        with open(self.out / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(f"{split}/{k}", v, self.step)

    def _open_outputs(self) -> None:
        if not self.dist.is_main:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(dump(self.cfg.resolved))
        (self.out / "plugins.json").write_text(json.dumps(plugin_manifest(self.cfg), indent=2))
        self.writer = SummaryWriter(str(self.out / "tb"))

    # -- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self, eval_metrics: Optional[Dict[str, float]] = None) -> None:
        key = self.cfg.eval.select_by
        if eval_metrics is not None and key in eval_metrics:
            better = (lambda new, old: new > old) if key == "rouge_l" else (lambda new, old: new < old)
            if self.best is None or better(eval_metrics[key], self.best["value"]):
                self.best = {"step": self.step, "metric": key, "value": eval_metrics[key]}
        state = {"best": self.best, "total_steps": self.total_steps}
        ckpt.save(self.ckpt_root, self.step, self.module, self.optimizer, self.scheduler, state,
                  self.dist.rank, self.dist.world_size, lambda: barrier(self.dist))
        if self.dist.is_main:
            ckpt.prune(self.ckpt_root, self.cfg.train.keep_last, self.best["step"] if self.best else None)
        barrier(self.dist)
        if self.best is not None and self.best["step"] == self.step:
            self._save_student("best", final=False)

    def maybe_resume(self) -> None:
        if not self.cfg.train.resume:
            return
        path = ckpt.latest(self.ckpt_root)
        if path is None:
            log.warning("train.resume=true but %s holds no checkpoint: starting from scratch", self.ckpt_root)
            return
        state = ckpt.load(path, self.module, self.optimizer, self.scheduler, self.dist.rank, self.device)
        if state.get("world_size", 1) != self.dist.world_size:
            log.warning("resuming a %s-process run with %s processes", state.get("world_size"), self.dist.world_size)
        self.step, self.best = state["step"], state.get("best")
        if self.dist.is_main:
            print(f"resumed from {path} at step {self.step}", flush=True)

    def save_final(self) -> Path:
        """The student with ``save_pretrained`` (loadable by plain transformers), atomically."""
        return self._save_student("final", final=True)

    def _save_student(self, name: str, final: bool) -> Path:
        """Write the student to ``output_dir/name`` through a temporary directory. ``final``
        lets the tuner export (LoRA: merge); before the end only tuner files (the adapter) are
        written for tuned students, since merging would change the model being trained."""
        import shutil

        target = self.out / name
        if self.dist.is_main:
            tmp = self.out / f".tmp-{name}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            tuner, student = self.parts.tuner, self.parts.student_model
            tuner.save_extra(student, tmp)
            if final or not hasattr(student, "peft_config"):
                tuner.export(student).save_pretrained(tmp) if final else student.save_pretrained(tmp)
            self.parts.student_tokenizer.save_pretrained(tmp)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        barrier(self.dist)
        return target

    # -- the loop ---------------------------------------------------------------------------
    def train(self) -> Dict[str, float]:
        from tqdm.auto import tqdm

        t = self.cfg.train
        self._open_outputs()
        self.maybe_resume()
        self.module.train()
        if self.step == 0 and t.eval_at_start:
            self.log("eval", self.evaluate())
        if self.step == 0:
            self.test_rouge_l("before")
        loader = self._loader(self.step)
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", disable=not self.dist.is_main, dynamic_ncols=True)
        micro: List = []
        last_eval: Dict[str, float] = {}
        tick = time.perf_counter()
        for mb in loader:
            micro.append(mb)
            if len(micro) < t.grad_accum:
                continue
            metrics = self.accumulate(micro)
            micro = []
            metrics["lr"] = self.optimizer.param_groups[0]["lr"]
            metrics["grad_norm"] = self.optimizer_step()
            self.step += 1
            now = time.perf_counter()
            metrics["tokens_per_s"] = metrics["tokens"] / max(now - tick, 1e-9)
            tick = now
            if t.log_every and (self.step % t.log_every == 0 or self.step == self.total_steps):
                self.log("train", metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
            last = self.step == self.total_steps
            if t.eval_every:
                evaluated = self.step % t.eval_every == 0 or last
            else:  # once per epoch, as the DSKD recipe
                evaluated = self.step % max(self.plan.steps_per_epoch, 1) == 0 or last
            if evaluated:
                last_eval = self.evaluate()
                self.log("eval", last_eval)
            if (t.save_every and self.step % t.save_every == 0) or (not t.save_every and evaluated) or last:
                self.save_checkpoint(last_eval if evaluated else None)
            tick = time.perf_counter()
        bar.close()
        self.test_rouge_l("after")
        self.save_final()
        if self.writer is not None:
            self.writer.close()
        return last_eval
