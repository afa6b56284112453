#!/usr/bin/env python
"""Benchmark the KD loss, forward + backward, naive versus chunked, for each criterion.

Both paths start from hidden states and output heads and end with ``.backward()``:

* **naive** — the full logits of all ``N`` rows, as most KD code does::

      student_logits = h_s @ W_s.T                       # [N, V], in the graph
      with torch.no_grad(): teacher_logits = h_t @ W_t.T # [N, V]
      criterion.per_token(student_logits, teacher_logits).sum().backward()

* **chunked** — kdcore's engine path, :func:`kdcore.kdspace.evaluate_space` on
  ``Space("student", Rows(h_s, Head(W_s)), Rows(h_t, Head(W_t, detach=True)), c)`` with
  ``--chunk-size`` rows per chunk (default: a budget of logits, ``auto_chunk_rows``), the fused
  path (each chunk's gradient computed in the forward pass, :mod:`kdcore.fused`), then
  ``.backward()`` of its ``kd_student`` sum;
* **checkpointed** (``--modes ... checkpointed``) — the same chunks through autograd under
  activation checkpointing (``evaluate_space(..., fused=False)``, ``objective.fused: false``),
  which recomputes both heads in backward.

``h_s`` requires grad (the gradient flows back into the student); the heads are frozen by
default so that the numbers are the loss's own memory (``--train-head`` also trains ``W_s``,
which adds the same ``V x hidden`` gradient to both paths).

Measurements. Every (criterion, V, tokens, path) runs in a fresh subprocess, so that nothing
one run allocated or cached can hide or inflate the next run's memory:

1. the inputs are allocated and a tiny warm-up step (8 rows) initialises kernels and libraries;
2. **CPU**: the process's resident set size is read (``/proc/self/statm``) as the baseline, the
   kernel's peak-RSS counter is reset (``echo 5 > /proc/self/clear_refs``, Linux ≥ 4.0), one
   full forward + backward runs, and the peak is ``VmHWM`` (``/proc/self/status``) minus the
   baseline. glibc's ``MALLOC_MMAP_THRESHOLD_`` is fixed at 1 MiB in the subprocess, so every
   tensor larger than that is its own ``mmap`` and is returned to the kernel when freed:
   RSS then tracks live tensor memory instead of malloc's caches, and the peak is exact to a
   page (plus small allocations). Where ``clear_refs`` is not writable the peak falls back to
   ``ru_maxrss`` (the lifetime peak), which can only be an over-estimate of the baseline's
   peak, so the delta may be under-reported for small runs; the script says so.
   **CUDA**: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
   ``memory_allocated()`` after the inputs (allocator-exact, caching excluded).
3. the wall time (``perf_counter``, CUDA synchronised) of that run and of ``--repeats − 1``
   further runs; the table shows the median.

A configuration is skipped, printing ``skipped (est. X GB)``, when its estimated process
memory (inputs plus a per-criterion multiple of the ``[rows, V]`` float32 size, calibrated on
this script's own measurements) exceeds ``--max-gb``.

``--criterion-level`` compares implementations of each criterion on ``[N, V]`` logits;
``--aligner-level`` measures each cross-vocabulary aligner's KD loss (:func:`aligner_worker`)
next to the same-vocabulary path, with the same peak measurement.

Examples::

    python tools/bench_losses.py --criteria fkl --vocab 151936 --tokens 4096
    python tools/bench_losses.py --vocab 50257 151936 --tokens 512 4096 --repeats 1
    python tools/bench_losses.py --aligner-level --vocab 151936 --teacher-vocab 152064 --tokens 4096 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

# Peak extra memory of the naive path (and of one chunk) in units of one [rows, V] float32
# tensor: both logits plus the criterion's own temporaries and gradients, measured with this
# script on CPU (fkl 8.3, rkl 7.3, jsd 11.8, skl 10.5, srkl 10.5, tvd 7.0, akl 9.5, ce 7.3) and
# rounded up; unknown criteria get a conservative 14.
PEAK_MULTIPLE = {"fkl": 9, "rkl": 8, "jsd": 12.5, "skl": 11, "srkl": 12, "tvd": 8, "akl": 10, "ce": 8}
DEFAULT_MULTIPLE = 14
GiB = 1024 ** 3
MiB = 1024 ** 2


# -- measurement helpers (run inside the worker) ------------------------------------------

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes(exact: bool) -> int:
    if exact:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(step, n: int, repeats: int, device) -> dict:
    """Warm ``step(rows)`` up on 8 rows, then run it on ``n`` rows ``repeats`` times: the peak
    extra memory of the first full run over the baseline after warm-up (see the module
    docstring), the median wall time, and the first run's return value."""
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    step(min(8, n))  # warm-up: kernels, libraries, allocator pools
    sync()
    exact = True
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        import gc

        gc.collect()
        baseline = _rss_bytes()
        exact = _reset_peak_rss()
    times = []
    t0 = time.perf_counter()
    value = step(n)
    sync()
    times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        peak = _peak_rss_bytes(exact) - baseline
    for _ in range(max(repeats, 1) - 1):
        t0 = time.perf_counter()
        step(n)
        sync()
        times.append(time.perf_counter() - t0)
    return {"ms": 1000 * statistics.median(times), "peak_bytes": peak, "exact": exact, "value": value,
            "times_ms": [1000 * t for t in times]}


def worker(args) -> dict:
    try:  # if a configuration does not fit after all, the kernel should kill this worker first
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
    import torch

    import kdcore
    from kdcore.kdspace import Head, Rows, Space, evaluate_space

    torch.set_grad_enabled(True)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device="cpu").manual_seed(0)
    n, v, d, dt = args.tokens, args.vocab, args.hidden, args.teacher_hidden or args.hidden

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    h_s = randn(n, d).requires_grad_(True)
    h_t = randn(n, dt)
    w_s = randn(v, d, scale=d ** -0.5 * 3).requires_grad_(args.train_head)
    w_t = randn(v, dt, scale=dt ** -0.5 * 3)
    criterion = kdcore.build("criterion", args.criterion)

    def step(rows: int):
        hs, ht = h_s[:rows], h_t[:rows]
        if args.mode == "naive":
            s_logits = hs @ w_s.T
            with torch.no_grad():
                t_logits = ht @ w_t.T
            loss = criterion.per_token(s_logits, t_logits).sum()
            del s_logits, t_logits
        else:
            space = Space("student", Rows(hs, Head(w_s)), Rows(ht, Head(w_t, detach=True)), criterion)
            losses, _ = evaluate_space(space, chunk_size=args.chunk_size or None, fused=args.mode == "chunked")
            loss = losses["kd_student"]
            del losses, space
        loss.backward()
        value = float(loss.detach())
        del loss
        h_s.grad = None
        w_s.grad = None
        return value

    return measure(step, n, args.repeats, device)


# -- driver ---------------------------------------------------------------------------------

def estimate_bytes(criterion: str, mode: str, v: int, n: int, d: int, dt: int, chunk: int, dtype_bytes: int) -> int:
    from kdcore.kdspace import auto_chunk_rows

    rows = n if mode == "naive" else min(chunk or auto_chunk_rows(v), n)
    inputs = (v * (d + dt) + n * (d + dt)) * dtype_bytes
    return int(inputs + PEAK_MULTIPLE.get(criterion, DEFAULT_MULTIPLE) * rows * v * 4 + 400 * MiB)


def run_one(args, criterion: str, mode: str, v: int, n: int) -> dict:
    cmd = ["--mode", mode, "--criterion", criterion, "--vocab", str(v), "--tokens", str(n),
           "--hidden", str(args.hidden), "--teacher-hidden", str(args.teacher_hidden or args.hidden),
           "--chunk-size", str(args.chunk_size), "--dtype", args.dtype]
    return spawn(args, cmd + (["--train-head"] if args.train_head else []))


def spawn(args, worker_args) -> dict:
    """Run one measurement in a fresh worker process (see the module docstring); its JSON result."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--device", args.device,
           "--repeats", str(args.repeats), *worker_args]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20), KDCORE_DISABLE_PLUGIN_AUTOLOAD="0",
               TRL_EXPERIMENTAL_SILENCE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return {"error": f"failed (exit {proc.returncode}: {tail[0][:80]})"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- cross-vocabulary spaces: each aligner's KD terms next to the same-vocabulary path ---------------

# aligner -> (projector, criterion): the standard configuration of each cross-vocabulary method;
# "same" is the same-vocabulary reference (one tokenizer, identity alignment, vanilla KD).
ALIGNER_SETUPS = {"same": ("none", "fkl"), "cma": ("dual", "fkl"), "mined": ("none", "fkl"), "uld": ("none", "uld")}


def aligner_worker(args) -> dict:
    """The KD loss of one aligner's standard configuration, as :class:`kdcore.distill.DistillModule`
    computes it after the two backbones: ``aligner.align`` -> ``projector.spaces`` ->
    :func:`kdcore.kdspace.evaluate_space` of every space (the default fused, chunked path, with the
    objective's weights) plus the student CE where the spaces lack it -> the objective -> backward.
    One sequence of ``tokens`` response positions per side (the same count on both, so the
    alignments are one-to-one); the student vocabulary is ``--vocab``, the teacher's
    ``--teacher-vocab`` (``same``: the student's). Heads frozen, as in the engine-level table;
    the student hidden states, the projections and CMA's query require grad."""
    import torch

    import kdcore
    from kdcore.distill import CE, objective, term_weight
    from kdcore.kdspace import Head, ModelSide, cross_entropy_sum, evaluate_space

    torch.set_grad_enabled(True)
    device = torch.device(args.device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    n, v_s, d = args.tokens, args.vocab, args.hidden
    v_t = v_s if args.aligner == "same" else args.teacher_vocab
    dt = args.hidden if args.aligner == "same" else (args.teacher_hidden or args.hidden)
    projector_name, criterion_name = ALIGNER_SETUPS[args.aligner]
    kd_weight = 0.5

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    def side(hidden, vocab, width, grad):
        labels = torch.randint(0, vocab, (1, n), generator=gen).to(device)
        embeddings = torch.nn.Embedding(vocab, width).to(device).requires_grad_(False)
        return ModelSide(hidden.requires_grad_(grad), Head(randn(vocab, width, scale=width ** -0.5 * 3)),
                         torch.randint(0, vocab, (1, n), generator=gen).to(device), labels,
                         torch.ones(1, n, dtype=torch.long, device=device), embeddings)

    student = side(randn(1, n, d), v_s, d, True)
    teacher = side(randn(1, n, dt), v_t, dt, False)
    teacher.head = teacher.head.detached()
    criterion = kdcore.build("criterion", criterion_name)
    hidden = dict(student_hidden_size=d, teacher_hidden_size=dt)
    projector = kdcore.build("projector", projector_name, **(hidden if projector_name == "dual" else {})).to(device)
    if args.aligner == "cma":
        aligner = kdcore.build("aligner", "cma", **hidden).to(device)
        align = lambda s, t: aligner.align(s, t)
    elif args.aligner == "mined":
        from kdcore_plugins.aligners.mined import MinEDAlignment

        # a vocabulary map onto 70 % of the student ids (each from a distinct teacher id), every row aligned
        s_ids = torch.randperm(v_s, generator=gen)[: int(0.7 * min(v_s, v_t))].sort().values.to(device)
        t_ids = torch.randperm(v_t, generator=gen)[: len(s_ids)].to(device)
        align = lambda s, t: MinEDAlignment(s, t, torch.arange(s.hidden.shape[1], device=device)[None], s_ids, t_ids,
                                            v_s)
    else:
        aligner = kdcore.build("aligner", "uld" if args.aligner == "uld" else "identity")
        align = lambda s, t: aligner.align(s, t)
    weights = lambda name: term_weight(name, kd_weight)

    def step(rows: int):
        s = ModelSide(student.hidden[:, :rows], student.head, student.input_ids[:, :rows], student.labels[:, :rows],
                      student.attention_mask[:, :rows], student.embeddings)
        t = ModelSide(teacher.hidden[:, :rows], teacher.head, teacher.input_ids[:, :rows], teacher.labels[:, :rows],
                      teacher.attention_mask[:, :rows], teacher.embeddings)
        terms = {}
        for space in projector.spaces(s, t, align(s, t), criterion):
            losses, _ = evaluate_space(space, args.chunk_size or None, weights)
            for key, value in losses.items():
                terms[key] = terms[key] + value if key in terms else value
        if CE not in terms:
            mask = s.mask
            terms[CE] = cross_entropy_sum(s.hidden[mask], s.head, s.labels[mask], args.chunk_size or None)
        loss = objective(terms, kd_weight, zero=torch.zeros((), device=device))
        loss.backward()
        value = float(loss.detach())
        del loss, terms
        student.hidden.grad = None
        for p in projector.parameters():
            p.grad = None
        return value

    result = measure(step, n, args.repeats, device)
    result["nv_bytes"] = n * v_s * 4
    return result


def aligner_table(args) -> int:
    """The cross-vocabulary table: each aligner's peak and time against the same-vocabulary path."""
    v_s, v_t = args.vocab[0], args.teacher_vocab
    print(f"device={args.device} student V={v_s} teacher V={v_t} hidden={args.hidden} "
          f"teacher_hidden={args.teacher_hidden or args.hidden} chunk_size={args.chunk_size} repeats={args.repeats}\n")
    print("| aligner | projector | criterion | tokens | ms | peak MiB | peak / same-vocabulary | time / same-vocabulary |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for n in args.tokens:
        ref = None
        for name in ["same", *args.aligners]:
            cell = spawn(args, ["--mode", "aligner", "--aligner", name, "--vocab", str(v_s), "--teacher-vocab",
                                str(v_t), "--tokens", str(n), "--hidden", str(args.hidden), "--teacher-hidden",
                                str(args.teacher_hidden or args.hidden), "--chunk-size", str(args.chunk_size)])
            ref = cell if name == "same" else ref
            projector, criterion = ALIGNER_SETUPS[name]
            if "error" in cell:
                print(f"| {name} | {projector} | {criterion} | {n} | {cell['error']} | | | |", flush=True)
                continue
            rel = lambda key: f"{cell[key] / ref[key]:.2f}" if ref and key in ref else "–"
            print(f"| {name} | {projector} | {criterion} | {n} | {cell['ms']:.0f} | {cell['peak_bytes'] / MiB:.0f} | "
                  f"{rel('peak_bytes')} | {rel('ms')} |", flush=True)
    return 0


# -- criterion level: kdcore's analytic gradient side by side with autograd formulas ---------------

IMPLEMENTATIONS = ("kdcore", "autograd", "dskd", "trl")
ENGINE_MODES = ("naive", "chunked", "checkpointed")
# TRL's generalized_jsd_loss covers three of the criteria: beta = 0 is forward KL, beta = 1
# reverse KL, and in between the same generalised JSD as ``jsd`` (beta = the teacher's weight).
TRL_BETA = {"fkl": 0.0, "rkl": 1.0, "jsd": 0.5}


def dskd_reference(name: str, temperature: float):
    """``f(student_logits, teacher_logits) -> [N]``: the criterion as the DSKD code writes it
    (docs/benchmarks.md, "Criteria"): float32 (log-)softmax of both sides, elementwise products
    with infinite-logit terms zeroed by ``masked_fill``, JS with ``+1e-9`` inside the logs, the
    skew mixtures in probability space, AKL by sorting and gathering, ULD by sorting and padding;
    backward by autograd. Written here from the formulas, for timing; kdcore's tests check the
    values against float64 references."""
    import torch
    import torch.nn.functional as F

    def probs(z):
        return F.softmax(z / temperature, -1, dtype=torch.float32), F.log_softmax(z / temperature, -1, dtype=torch.float32)

    def kl(zs, zt):
        p_t, lp_t = probs(zt)
        _, lp_s = probs(zs)
        inf = torch.isinf(zs)
        return ((p_t * lp_t).masked_fill(inf, 0) - (p_t * lp_s).masked_fill(inf, 0)).sum(-1)

    def rkl(zs, zt):
        p_s, lp_s = probs(zs)
        _, lp_t = probs(zt)
        inf = torch.isinf(zs) | torch.isinf(zt)
        return -((p_s * lp_t).masked_fill(inf, 0) - (p_s * lp_s).masked_fill(inf, 0)).sum(-1)

    def js(zs, zt):
        (p_s, _), (p_t, _) = probs(zs), probs(zt)
        log_m = torch.log((p_s + p_t) / 2 + 1e-9)
        return 0.5 * (p_t * (torch.log(p_t + 1e-9) - log_m)).sum(-1) + 0.5 * (p_s * (torch.log(p_s + 1e-9) - log_m)).sum(-1)

    def skewed(zs, zt, lam=0.1, reverse=False):
        (p_s, lp_s), (p_t, lp_t) = probs(zs), probs(zt)
        p, lp, mixed = (p_s, lp_s, lam * p_s + (1 - lam) * p_t) if reverse else (p_t, lp_t, lam * p_t + (1 - lam) * p_s)
        inf = torch.isinf(zs)
        return ((p * lp).masked_fill(inf, 0) - (p * torch.log(mixed)).masked_fill(inf, 0)).sum(-1)

    def akl(zs, zt, alpha=0.5):
        (p_s, _), (p_t, _) = probs(zs), probs(zt)
        sorted_t, order = p_t.sort(-1)
        gap = (sorted_t - p_s.gather(-1, order)).abs()
        tail = sorted_t.cumsum(-1) <= alpha
        g_head, g_tail = (gap * ~tail).sum(-1).detach(), (gap * tail).sum(-1).detach()
        return (g_head * kl(zs, zt) + g_tail * rkl(zs, zt)) / (g_head + g_tail)

    def tvd(zs, zt):
        return 0.5 * (probs(zs)[0] - probs(zt)[0]).abs().sum(-1)

    def ce(zs, zt):
        p_t, _ = probs(zt)
        return -(p_t * probs(zs)[1]).masked_fill(torch.isinf(zs), 0).sum(-1)

    def uld(zs, zt):
        p_s, p_t = probs(zs)[0].sort(-1, descending=True).values, probs(zt)[0].sort(-1, descending=True).values
        width = max(p_s.shape[-1], p_t.shape[-1])
        return (F.pad(p_s, (0, width - p_s.shape[-1])) - F.pad(p_t, (0, width - p_t.shape[-1]))).abs().sum(-1)

    return {"fkl": kl, "rkl": rkl, "jsd": js, "skl": skewed, "srkl": lambda zs, zt: skewed(zs, zt, reverse=True),
            "akl": akl, "tvd": tvd, "ce": ce, "uld": uld}[name]


def trl_available() -> bool:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        from trl.experimental.gkd.gkd_trainer import GKDTrainer  # noqa: F401
    except Exception:  # not installed, or its import chain fails: the column is skipped
        return False
    return True


def criterion_loss(impl: str, name: str):
    """``loss(student_logits, teacher_logits) -> scalar`` (the sum over rows) of one implementation."""
    import kdcore
    from kdcore.criterion import kd_per_token

    criterion = kdcore.build("criterion", name)  # the defaults: T = 1, beta 0.5, skew 0.1, alpha 0.5
    if impl == "kdcore":
        return lambda s, t: kd_per_token(criterion, s, t).sum()
    if impl == "autograd":
        return lambda s, t: criterion.per_token(s, t).sum()
    if impl == "dskd":
        reference = dskd_reference(name, criterion.temperature)
        return lambda s, t: reference(s, t).sum()
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    return lambda s, t: GKDTrainer.generalized_jsd_loss(s, t, beta=TRL_BETA[name], temperature=criterion.temperature,
                                                        reduction="sum")


def norm64(t) -> float:
    """The float64 Euclidean norm of ``t[N, V]``, computed over blocks of rows: a whole float64 copy
    would be 2 [N, V] float32 tensors, counted in the measured peak (the checksum ran before the
    peak was read), which is not the loss's memory."""
    import math

    rows = max(1, (1 << 18) // max(t.shape[-1], 1))
    return math.sqrt(sum(float(block.double().square().sum()) for block in t.split(rows)))


def criterion_worker(args) -> dict:
    """Forward + backward of one implementation on student and teacher logits ``[N, V]``
    (float32, ``N(0, 2²)``, the same seed for every implementation); the student logits are a
    leaf that requires grad, the teacher logits are constants."""
    import torch

    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    n, v = args.tokens, args.vocab
    student = (torch.randn(n, v, generator=gen) * 2).to(device).requires_grad_(True)
    teacher = (torch.randn(n, v, generator=gen) * 2).to(device)
    loss_fn = criterion_loss(args.impl, args.criterion)
    checksum = {}

    def step(rows: int):
        s = student[:rows].detach().requires_grad_(True) if rows < n else student
        loss = loss_fn(s, teacher[:rows])
        loss.backward()
        value = float(loss.detach())
        checksum["grad"] = norm64(s.grad)
        del loss
        student.grad = None
        return value

    result = measure(step, n, args.repeats, device)
    result["grad_norm"] = checksum["grad"]
    result["nv_bytes"] = n * v * 4
    return result


def side_by_side(args, criteria) -> int:
    """The criterion-level table: every implementation of every criterion on every shape."""
    shapes = [tuple(int(x) for x in shape.lower().split("x")) for shape in args.shapes]
    impls = [i for i in IMPLEMENTATIONS if i != "trl" or trl_available()]
    print(f"device={args.device} repeats={args.repeats} shapes={' '.join(args.shapes)} "
          f"trl={'yes' if 'trl' in impls else 'not installed (column skipped)'}")
    print("\nPeak: extra memory of forward + backward in [N, V] float32 tensors (inputs excluded, the "
          "student gradient included). ms: median wall time. Ratios: kdcore / DSKD formulas.\n")
    print("| criterion | N×V | kdcore ms | autograd ms | DSKD ms | TRL ms | kdcore peak | autograd peak | DSKD peak "
          "| TRL peak | time ratio | peak ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    warnings = []
    for name in criteria:
        for n, v in shapes:
            cells = {}
            for impl in impls:
                if impl == "trl" and name not in TRL_BETA:
                    continue
                cells[impl] = spawn(args, ["--mode", "criterion", "--impl", impl, "--criterion", name,
                                           "--vocab", str(v), "--tokens", str(n)])
            warnings += agreement(name, n, v, cells)
            print(table_row(name, n, v, cells), flush=True)
    for line in warnings:
        print(f"\nWARNING: {line}")
    return 0


def agreement(name, n, v, cells):
    """Warnings where kdcore's loss or gradient norm differs from autograd's on the same formula."""
    a, b = cells.get("kdcore", {}), cells.get("autograd", {})
    out = []
    for key in ("value", "grad_norm"):
        if key in a and key in b and abs(a[key] - b[key]) > 1e-4 * abs(b[key]) + 1e-6:
            out.append(f"{name} {n}x{v}: kdcore {key} {a[key]:.8g} vs autograd {b[key]:.8g}")
    return out


def table_row(name, n, v, cells) -> str:
    def ms(impl):
        c = cells.get(impl)
        return "–" if c is None else c.get("error") or f"{c['ms']:.0f}"

    def peak(impl):
        c = cells.get(impl)
        return "–" if c is None else c.get("error") or f"{c['peak_bytes'] / c['nv_bytes']:.2f}"

    def ratio(key):
        k, d = cells.get("kdcore", {}), cells.get("dskd", {})
        if key not in k or key not in d:
            return "–"
        return f"{k[key] / d[key]:.2f}" if key == "ms" else f"{(k[key] / k['nv_bytes']) / (d[key] / d['nv_bytes']):.2f}"

    impls = ("kdcore", "autograd", "dskd", "trl")
    return (f"| {name} | {n}×{v} | " + " | ".join(ms(i) for i in impls) + " | " + " | ".join(peak(i) for i in impls)
            + f" | {ratio('ms')} | {ratio('peak_bytes')} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[50257, 151936, 262144])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 4096, 8192])
    parser.add_argument("--hidden", type=int, default=576, help="student hidden size (default 576)")
    parser.add_argument("--teacher-hidden", type=int, default=None, help="teacher hidden size (default: --hidden)")
    parser.add_argument("--criteria", nargs="+", default=None, help="criterion names (default: all registered)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per configuration; the median is shown")
    parser.add_argument("--chunk-size", type=int, default=0,
                        help="rows per chunk of the chunked path (0: the engine default, kdcore.kdspace.auto_chunk_rows(V))")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of hidden states and heads (criteria compute in float32)")
    parser.add_argument("--train-head", action="store_true", help="the student head W_s also requires grad")
    parser.add_argument("--max-gb", type=float, default=16.0, help="skip configurations estimated above this")
    parser.add_argument("--criterion-level", action="store_true",
                        help="instead: each criterion on [N, V] logits, kdcore's kd_per_token (analytic gradient) "
                             "side by side with autograd on per_token, the DSKD formulas and TRL's generalized_jsd_loss")
    parser.add_argument("--shapes", nargs="+", default=["512x50257", "128x151936"],
                        help="N x V logits shapes of --criterion-level (default: 512x50257 128x151936)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--modes", nargs="+", default=["naive", "chunked"], choices=ENGINE_MODES,
                        help="engine-level paths to measure (default: naive chunked; add checkpointed)")
    parser.add_argument("--aligner-level", action="store_true",
                        help="instead: the KD loss of each cross-vocabulary aligner's standard configuration (cma + "
                             "dual, mined + none, uld + none + uld) next to the same-vocabulary path (identity + none)")
    parser.add_argument("--aligners", nargs="+", default=["cma", "mined", "uld"], choices=["cma", "mined", "uld"],
                        help="aligners of --aligner-level (default: all three)")
    parser.add_argument("--teacher-vocab", type=int, default=152064,
                        help="teacher vocabulary of --aligner-level (default 152,064: Qwen2.5-7B's head)")
    parser.add_argument("--mode", choices=[*ENGINE_MODES, "criterion", "aligner"], help=argparse.SUPPRESS)
    parser.add_argument("--aligner", choices=list(ALIGNER_SETUPS), help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    parser.add_argument("--criterion", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.worker:
        args.vocab, args.tokens = args.vocab[0], args.tokens[0]
        workers = {"criterion": criterion_worker, "aligner": aligner_worker}
        print(json.dumps(workers.get(args.mode, worker)(args)))
        return 0

    import kdcore

    criteria = args.criteria or kdcore.names("criterion")
    unknown = [c for c in criteria if c not in kdcore.names("criterion")]
    if unknown:
        parser.error(f"unknown criteria {unknown}; registered: {', '.join(kdcore.names('criterion'))}")
    if args.criterion_level:
        return side_by_side(args, criteria)
    if args.aligner_level:
        return aligner_table(args)
    return naive_vs_chunked(args, criteria)


def naive_vs_chunked(args, criteria) -> int:
    """The engine-level table: naive versus chunked KD loss from hidden states."""
    dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}[args.dtype]
    dt = args.teacher_hidden or args.hidden
    print(f"device={args.device} hidden={args.hidden} teacher_hidden={dt} dtype={args.dtype} "
          f"chunk_size={args.chunk_size} repeats={args.repeats} train_head={args.train_head} max_gb={args.max_gb:g}")
    print()
    modes = args.modes
    print("| criterion | V | tokens | " + " | ".join(f"{m} ms" for m in modes) + " | "
          + " | ".join(f"{m} peak MiB" for m in modes) + " | ratio (chunked/naive peak) |")
    print("|---|---:|---:|" + "---:|" * (2 * len(modes) + 1))
    inexact = False
    mismatches = []
    for criterion in criteria:
        for v in args.vocab:
            for n in args.tokens:
                cells = {}
                for mode in modes:
                    est = estimate_bytes(criterion, mode, v, n, args.hidden, dt, args.chunk_size, dtype_bytes)
                    if est > args.max_gb * GiB:
                        cells[mode] = {"skip": f"skipped (est. {est / GiB:.1f} GB)"}
                    else:
                        cells[mode] = run_one(args, criterion, mode, v, n)
                        inexact |= cells[mode].get("exact") is False
                values = {m: c["value"] for m, c in cells.items() if "value" in c}
                ref = next(iter(values.values()), None)
                for m, value in values.items():
                    if abs(value - ref) > 1e-4 * abs(ref) + 1e-3:
                        mismatches.append(f"{criterion} V={v} tokens={n}: {m} loss {value:.6g} vs {ref:.6g}")
                times = [c.get("skip") or c.get("error") or f"{c['ms']:.0f}" for c in cells.values()]
                peaks = [c.get("skip") or c.get("error") or f"{c['peak_bytes'] / MiB:.0f}" for c in cells.values()]
                nv, ch = cells.get("naive", {}), cells.get("chunked", {})
                ratio = f"{ch['peak_bytes'] / nv['peak_bytes']:.3f}" if "peak_bytes" in nv and "peak_bytes" in ch else "–"
                print(f"| {criterion} | {v} | {n} | " + " | ".join(times + peaks) + f" | {ratio} |", flush=True)
    for line in mismatches:
        print(f"\nWARNING: the two paths disagree: {line}")
    if inexact:
        print("\nnote: /proc/self/clear_refs was not writable; CPU peaks are ru_maxrss deltas (may under-report).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
