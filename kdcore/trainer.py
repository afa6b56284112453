"""The training loop shared by every method (vanilla KD, DSKD, MinED, ULD, SFT, ...).

One optimizer step = ``grad_accum`` micro-batches on each of ``world_size`` ranks. The loss of
every micro-batch is ``Σ token terms / N_global × world_size``, where ``N_global`` is the number
of student response tokens in the whole global batch (all micro-batches, all ranks): DDP's
gradient averaging then yields exactly the token mean over the global batch. The pieces live
elsewhere: the objective in :mod:`kdcore.distill`, data order in :mod:`kdcore.data`, metrics in
:mod:`kdcore.metrics`, the optimizer in :mod:`kdcore.optim`, what a run saves, exports and resumes in
:class:`kdcore.checkpoint.RunCheckpoints`, ROUGE-L in :mod:`kdcore.evaluate`, lifecycle hooks in :mod:`kdcore.hooks`.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Dict, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from .assemble import Components, build_components, write_run_files
from .checkpoint import Checkpoints, RunCheckpoints, check_output_dir, latest
from .config import Config
from .data import RunData, global_tokens
from .distill import LOSS, DistillModule, forward_into, with_loss
from .distributed import DistInfo, autocast_dtype
from .evaluate import RunEvaluation
from .guard import StepGuard
from .hooks import RunContext, RunHooks
from .metrics import MetricLog, MetricSums, merge
from .optim import build_optimizer, optimizer_step
from .sharding import strategy_for
from .telemetry import Throughput

log = logging.getLogger(__name__)


def set_up_process(seed: int, threads: int) -> None:
    """Process-wide settings: torch's CPU threads (``train.threads``; 0 keeps torch's default), every RNG's seed."""
    if threads:
        torch.set_num_threads(threads)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class Cadence:
    """When a step is logged (``log_every``), evaluated (``eval_every``; 0 = once per epoch, as
    DSKD) and checkpointed (``save_every``; 0 = at every evaluation); the last step always is."""

    def __init__(self, train, steps_per_epoch: int, total_steps: int):
        self.t, self.epoch, self.total = train, max(steps_per_epoch, 1), total_steps

    def logs(self, step: int) -> bool:
        return bool(self.t.log_every) and (step % self.t.log_every == 0 or step == self.total)

    def evaluates(self, step: int) -> bool:
        return step % (self.t.eval_every or self.epoch) == 0 or step == self.total

    def saves(self, step: int, evaluated: bool) -> bool:
        return (step % self.t.save_every == 0) if self.t.save_every else (evaluated or step == self.total)


class Trainer:
    """Builds everything from a :class:`Config` and runs ``train()``; one step is :meth:`train_step`."""

    def __init__(self, config: Config, dist_info: DistInfo, components: Optional[Components] = None):
        self.cfg, self.dist, t = config, dist_info, config.train
        self.out, self.device = check_output_dir(config.run.output_dir, create=True), dist_info.device
        self.amp = autocast_dtype(t.precision, self.device)
        self.sharding = strategy_for(t.strategy, dist_info, self.amp)  # ddp replicas or fsdp shards
        store = Checkpoints(self.out, dist_info, t.keep_last, config.eval.select_by, self.sharding.checkpoint_format)
        store.refuse_existing(t.resume)  # before any weights are loaded
        set_up_process(config.run.seed + dist_info.rank, t.threads)
        self.parts = p = components or build_components(config, load_weights=True)
        self.module = DistillModule.for_run(p, config.objective, self.sharding.build_device)
        self.model = self.sharding.wrap(self.module, p)
        self.data = RunData(p.task, p, t, config.eval, config.uses_teacher, dist_info, config.run.seed)
        self.total_steps = self.data.total_steps(t.max_steps, t.epochs)
        self.optimizer, self.scheduler = build_optimizer(self.module, t, self.total_steps)
        self.cadence = Cadence(t, self.data.plan().steps_per_epoch, self.total_steps)
        self.evaluation = RunEvaluation(config, p, self.module, self.data, dist_info, self.device, self.amp,
                                        lockstep=self.sharding.lockstep)
        self.throughput = Throughput(self.device, self.amp, t.peak_flops)
        self.timer = self.module.timer = self.throughput.timer
        self.guard = StepGuard(dist_info, t.max_consecutive_skips)
        self.checkpoints = RunCheckpoints(store, config, p, (self.module, self.optimizer, self.scheduler), self.guard,
                                          self.sharding)
        self.step, self.run, self.log, self.hooks, self.preempted = 0, RunContext(self), None, None, False

    def train(self) -> Dict[str, float]:
        try:
            return self._train()
        except BaseException:
            if self.hooks is not None:  # a failed run's components must not stay hooked into later runs of the process
                self.hooks.close()
            raise

    def _train(self) -> Dict[str, float]:
        self._start()
        last_eval: Dict[str, float] = {}
        steps = iter(self.data.steps(self.step, self.total_steps))
        with self.guard, tqdm(total=self.total_steps, initial=self.step, desc="train", disable=not self.dist.is_main,
                              dynamic_ncols=True) as bar:  # closed (its line ended) before any error is printed
            while not self.preempted:
                tick = time.perf_counter()
                with self.timer.section("data"):
                    micro = next(steps, None)
                if micro is None:
                    break
                metrics = self.train_step(micro)
                self.throughput.step_metrics(metrics, self.flops, time.perf_counter() - tick)  # tokens/s, MFU, split
                self.hooks.report("kdcore_after_step", metrics, step=self.step)
                if self.cadence.logs(self.step):
                    self.log.log("train", self.step, metrics)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics[LOSS]:.4f}", lr=f"{metrics['lr']:.2e}")
                last_eval = self._evaluate_and_save(last_eval)
                self.guard.check(self.step, latest(self.checkpoints.root))
                self.preempted = self.guard.should_stop() and self.step < self.total_steps
            if self.preempted:  # a scheduler's signal: checkpoint this step (unless just done) and end the run
                bar.close()
                if self.checkpoints.saved_step != self.step:
                    self.save_checkpoint()
        return self._end(last_eval)

    def train_step(self, micro_batches) -> Dict[str, float]:
        """One optimizer step over this rank's micro-batches of a global batch (skipped, on
        every rank, when its loss or gradient norm is not finite: :mod:`kdcore.guard`)."""
        micro_batches = self.parts.targets.step_batches(micro_batches, self.run)
        self.hooks.call("kdcore_before_step", step=self.step, batches=micro_batches)
        metrics = self.accumulate(micro_batches)
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        with self.timer.section("optimizer"):
            metrics["grad_norm"] = self.optimizer_step(metrics.get(LOSS, 0.0))
        metrics["skipped"], metrics["skipped_steps"] = float(self.guard.last_skipped), float(self.guard.skipped)
        self.step += 1
        return metrics

    def accumulate(self, micro_batches) -> Dict[str, float]:
        """Forward/backward over this rank's micro-batches of one global batch; leaves the summed
        gradients in ``.grad`` and returns the global means of every term."""
        counts, n_global, n_all = global_tokens(micro_batches, self.dist, self.device)
        sums, self.flops = MetricSums(), 0.0  # self.flops: this rank's model FLOPs of the step
        for i, (mb, tokens) in enumerate(zip(micro_batches, counts)):
            with self.sharding.no_sync(self.model, last=i == len(micro_batches) - 1):
                loss = forward_into(self.model, mb, tokens, sums, self.device, self.amp)
                with self.timer.section("backward"):
                    (loss * (self.dist.world_size / n_global)).backward()
            self.flops += self.module.last_flops
        metrics = with_loss(sums.reduce(self.dist, self.device), sums.term_names, self.cfg.objective.kd_weight)
        return {**metrics, "tokens": n_global, "all_tokens": n_all}

    def optimizer_step(self, loss: float = 0.0) -> float:
        params = [p for p in self.module.parameters() if p.requires_grad]
        return optimizer_step(params, self.optimizer, self.scheduler, self.cfg.train.clip_grad,
                              skip=lambda norm: self.guard.skip(loss, norm, self.step + 1))

    def _evaluate_and_save(self, last_eval: Dict[str, float]) -> Dict[str, float]:
        """Evaluate and checkpoint on cadence; every evaluation is a candidate for ``best/``."""
        evaluated = self.cadence.evaluates(self.step)
        last_eval = self.evaluate_and_log() if evaluated else last_eval
        is_best = evaluated and self.checkpoints.store.observe(self.step, last_eval)
        if self.cadence.saves(self.step, evaluated) or self.step == self.total_steps:
            self.save_checkpoint()
        if is_best:
            self.checkpoints.export("best")
        return last_eval

    def evaluate(self) -> Dict[str, float]:
        return self.evaluation.terms()

    def evaluate_and_log(self) -> Dict[str, float]:
        with self.timer.section("eval"):
            metrics = self.evaluate()
        metrics.update(self.timer.take())
        self.hooks.report("kdcore_after_eval", metrics, step=self.step)
        self.log.log("eval", self.step, metrics)
        return metrics

    def dev_rouge_l(self) -> float:
        return self.evaluation.dev_rouge_l()

    def save_checkpoint(self) -> None:
        self.checkpoints.save(self.step, self.total_steps, self.hooks)

    def maybe_resume(self) -> bool:
        """Restore the newest valid checkpoint when ``train.resume``; whether one was restored."""
        restored = self.checkpoints.resume(self.device)
        if restored is not None:
            self.step = restored[1]["step"]
            self.hooks.call("kdcore_checkpoint_load", step=self.step, directory=restored[0])
        return restored is not None

    def _start(self) -> None:
        """Outputs, hooks, resume, and the evaluations before training."""
        self.hooks = RunHooks(self.run, self.parts.instances())
        resumed = self.maybe_resume()  # before config.yaml is rewritten: a changed config is refused first
        if self.dist.is_main:
            write_run_files(self.cfg, self.out)
        self.log = MetricLog(self.out, self.dist.is_main, resume_step=self.step if resumed else None)
        self.throughput.start()
        self.module.train()
        self.hooks.call("kdcore_run_start")
        if self.step == 0 and self.cfg.train.eval_at_start:
            self.evaluate_and_log()
        if self.step == 0:
            self.log.log("test", self.step, self.evaluation.test_split("before", self.out))

    def _end(self, last_eval: Dict[str, float]) -> Dict[str, float]:
        """Unless preempted: test-split ROUGE-L after training, ``final/`` (loadable by plain
        transformers), the summary and ``kdcore_run_end``. Then the hooks and the log close."""
        if not self.preempted:
            self.log.log("test", self.step, self.evaluation.test_split("after", self.out))
            self.checkpoints.export("final")
            summary = self.throughput.summary(print_table=self.dist.is_main)
            merge(summary, self.hooks.call("kdcore_run_end", metrics=dict(last_eval)), "kdcore_run_end")
            self.log.log("summary", self.step, summary)
        self.hooks.close()
        self.log.close()
        return last_eval
