"""Circuit probes: measurements of a model's internals, and the hooks they are built on.

A probe (plugin kind ``probe``, :mod:`kdcore.kinds`) looks inside one causal LM: it builds its
prompts for the model's tokenizer, runs the model with some internal activations overwritten and
reports what changed. ``kd-probe`` runs probes on any models and compares them
(:mod:`kdcore.probe_cli`); a training run runs the probes of ``eval.probes`` on the student at
every evaluation (and once on the teacher at the start), logs their summary metrics
(``probe/<name>/<metric>`` in ``metrics.jsonl`` and TensorBoard) and writes their full results
to ``<output_dir>/probes/<name>/``.

The internals are reached with plain PyTorch forward pre-hooks on the HF model itself
(:class:`ModelSites`), so a probe measures exactly the forward pass that kd-train trains, on any
layout that has decoder layers with an attention output projection (GPT-2 ``attn.c_proj``;
Llama, Qwen2, Gemma3, Mistral ``self_attn.o_proj``). Two sites per layer ``l``:

* ``z[l]``: the per-head attention output before the output projection, the input of
  ``o_proj`` / ``c_proj`` seen as ``[B, T, H, d_h]`` (``H`` query heads, ``d_h`` =
  in_features / H; TransformerLens calls it ``hook_z``);
* ``resid[l]``: the residual stream entering layer ``l``, ``[B, T, d]`` (``resid_pre``).

An :class:`Edit` overwrites a site for selected batch rows, heads and positions, so many
patching variants run in one batched forward pass.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, Iterator, List, Optional, Sequence

import torch

from .errors import KdcoreError, ModelError
from .hookspecs import hookimpl


class ProbeError(KdcoreError):
    """A probe cannot run on this model or tokenizer (no admissible prompts, bad head ids)."""


@dataclass
class Edit:
    """Overwrite a site during one forward pass.

    site: ``"z"`` (per-head attention output, values ``[B, T, H, d_h]``) or ``"resid"``
      (residual stream entering the layer, values ``[B, T, d]``); ``values`` may omit the
      batch dimension (``[T, ...]``, e.g. a mean over a data set) and is broadcast.
    layer: the decoder layer index.
    mask: which entries take ``values``: for ``z`` a bool ``[B, H]`` (rows × heads) or
      ``[B, T, H]`` (rows × positions × heads); for ``resid`` a bool ``[B, T]``.
    """

    site: str
    layer: int
    values: torch.Tensor
    mask: torch.Tensor


@dataclass
class Recording:
    """Activations recorded during a forward pass: ``z[l]`` ``[B, T, H, d_h]``, ``resid[l]``
    ``[B, T, d]`` (only the sites asked for)."""

    z: Dict[int, torch.Tensor] = field(default_factory=dict)
    resid: Dict[int, torch.Tensor] = field(default_factory=dict)


def _attention_output_projection(layer: torch.nn.Module, index: int) -> torch.nn.Module:
    for attn_name in ("self_attn", "attn", "attention", "self_attention"):
        attn = getattr(layer, attn_name, None)
        if attn is None:
            continue
        for proj_name in ("o_proj", "c_proj", "out_proj", "dense"):
            proj = getattr(attn, proj_name, None)
            if isinstance(proj, torch.nn.Module):
                return proj
    raise ModelError(f"decoder layer {index} ({type(layer).__name__}): no attention output projection "
                     "(self_attn.o_proj or attn.c_proj) found; this layout is not supported by the probes")


def _in_features(proj: torch.nn.Module) -> int:
    if isinstance(proj, torch.nn.Linear):
        return proj.in_features
    weight = getattr(proj, "weight", None)
    if weight is not None and weight.dim() == 2 and type(proj).__name__ == "Conv1D":  # GPT-2: weight [in, out]
        return int(weight.shape[0])
    if weight is not None and weight.dim() == 2:
        return int(weight.shape[1])
    raise ModelError(f"{type(proj).__name__}: cannot read the input width of the attention output projection")


class ModelSites:
    """The hookable sites of an HF causal LM and a batched forward pass with edits.

    ``n_layers`` decoder layers, ``n_heads`` query heads per layer of width ``head_dim``.
    """

    def __init__(self, model: torch.nn.Module):
        from .models import decoder_layers

        self.model = model
        self.layers = decoder_layers(model)
        self.projections = [_attention_output_projection(layer, i) for i, layer in enumerate(self.layers)]
        text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.n_heads = int(getattr(text, "num_attention_heads", 0) or getattr(text, "n_head", 0))
        if self.n_heads < 1:
            raise ModelError(f"{type(model).__name__}: the config gives no number of attention heads")
        width = _in_features(self.projections[0])
        if width % self.n_heads:
            raise ModelError(f"attention output projection width {width} is not a multiple of {self.n_heads} heads")
        self.head_dim = width // self.n_heads
        self.n_layers = len(self.layers)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @contextmanager
    def _hooks(self, edits: Sequence[Edit], record: Recording, record_z: Sequence[int],
               record_resid: Sequence[int]) -> Iterator[None]:
        by_site: Dict[tuple, List[Edit]] = {}
        for e in edits:
            if e.site not in ("z", "resid"):
                raise ValueError(f"unknown site {e.site!r}")
            if not 0 <= e.layer < self.n_layers:
                raise ProbeError(f"layer {e.layer} out of range [0, {self.n_layers})")
            by_site.setdefault((e.site, e.layer), []).append(e)
        handles = []

        def z_hook(layer):
            def hook(module, args, kwargs):
                x = args[0] if args else kwargs["hidden_states"]
                b, t, _ = x.shape
                z = x.reshape(b, t, self.n_heads, self.head_dim)
                for e in by_site.get(("z", layer), []):
                    mask = e.mask.to(z.device)
                    mask = mask[:, None, :, None] if mask.dim() == 2 else mask[..., None]
                    z = torch.where(mask, e.values.to(z.dtype).to(z.device), z)
                if layer in record_z:
                    record.z[layer] = z.detach().clone()
                x = z.reshape(b, t, -1)
                return ((x,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})
            return hook

        def resid_hook(layer):
            def hook(module, args, kwargs):
                h = args[0] if args else kwargs["hidden_states"]
                for e in by_site.get(("resid", layer), []):
                    h = torch.where(e.mask.to(h.device)[..., None], e.values.to(h.dtype).to(h.device), h)
                if layer in record_resid:
                    record.resid[layer] = h.detach().clone()
                return ((h,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})
            return hook

        try:
            for layer in range(self.n_layers):
                if ("z", layer) in by_site or layer in record_z:
                    handles.append(self.projections[layer].register_forward_pre_hook(z_hook(layer), with_kwargs=True))
                if ("resid", layer) in by_site or layer in record_resid:
                    handles.append(self.layers[layer].register_forward_pre_hook(resid_hook(layer), with_kwargs=True))
            yield
        finally:
            for h in handles:
                h.remove()

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, edits: Sequence[Edit] = (), last: int = 0,
                record_z: Sequence[int] = (), record_resid: Sequence[int] = ()):
        """Logits of ``input_ids`` ``[B, T]`` (no padding) with ``edits`` applied: ``[B, last, V]``
        for the last ``last`` positions (all ``T`` when 0), float32, and the :class:`Recording`
        of the sites asked for (recorded *after* the edits of that site)."""
        record = Recording()
        was_training = self.model.training
        self.model.eval()
        try:
            with self._hooks(edits, record, set(record_z), set(record_resid)):
                out = self.model(input_ids=input_ids.to(self.device), use_cache=False, logits_to_keep=last)
        finally:
            self.model.train(was_training)
        return out.logits.float(), record


def parse_heads(heads: Sequence[str], n_layers: int, n_heads: int, where: str = "heads") -> List[tuple]:
    """``["8.11", "9.9"]`` -> ``[(8, 11), (9, 9)]``, checked against the model's size."""
    out = []
    for text in heads:
        layer, dot, head = str(text).partition(".")
        if not dot or not layer.isdigit() or not head.isdigit():
            raise ProbeError(f"{where}: {text!r} is not LAYER.HEAD (e.g. '8.11')")
        lh = (int(layer), int(head))
        if lh[0] >= n_layers or lh[1] >= n_heads:
            raise ProbeError(f"{where}: head {text} does not exist in a model of {n_layers} layers x {n_heads} heads")
        out.append(lh)
    return out


def head_name(layer: int, head: int) -> str:
    return f"{layer}.{head}"


class Probe:
    """Base class of circuit probes.

    A subclass sets ``name`` and implements :meth:`run`, which returns a JSON-able dict with
    at least ``"summary": {metric: float}`` (what training logs). Constructor keyword
    arguments are the probe's config fields (``eval.probes: [{name: ..., n_prompts: 16}]``).
    ``plot`` may write figures for ``kd-probe``; ``compare`` may add Markdown comparing the
    results of several models.
    """

    name: ClassVar[str]
    #: run once on the teacher at the start of a training run (for comparison in the run dir)
    probe_teacher: ClassVar[bool] = True

    def run(self, model, tokenizer, progress: bool = False) -> Dict[str, Any]:
        raise NotImplementedError

    def plot(self, result: Dict[str, Any], out_dir: Path, label: str) -> List[Path]:
        return []

    def compare(self, results: Dict[str, Dict[str, Any]], layer_maps: Dict[str, Optional[List[int]]]) -> str:
        """Markdown comparing ``results`` (label -> result); ``layer_maps`` gives, per label,
        the teacher layer each of its layers was cut from (``keep_layers``) or ``None``."""
        return ""

    # -- training: lifecycle hooks ------------------------------------------------------
    def _write(self, run, stem: str, result: Dict[str, Any]) -> None:
        if not run.is_main:
            return
        out = run.output_dir / "probes" / self.name
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.json").write_text(json.dumps(result, indent=1))

    @hookimpl
    def kdcore_run_start(self, run):
        # Every rank runs the forward pass (a sharded model needs all of them); rank 0 writes.
        if self.probe_teacher and run.teacher_model is not None:
            self._write(run, "teacher", self.run(run.teacher_model, run.teacher_tokenizer))

    @hookimpl
    def kdcore_after_eval(self, run, step, metrics):
        result = self.run(run.student_model, run.student_tokenizer)
        result["step"] = step
        self._write(run, f"student-step{step:06d}", result)
        return {f"probe/{self.name}/{k}": float(v) for k, v in result["summary"].items()}
