"""``circuit_ablation``: does a small set of heads carry the acronym task? (seed-methods §3.6)

Mean-ablation: every head's output ``z[l, h]`` (before the output projection) is replaced by
its mean over the corrupted prompts, per position, except the heads kept; MLPs are never
ablated. Starting from nothing kept, heads are added one at a time in ``heads`` order (the
paper's GPT-2 circuit: 8.11, 9.9, 10.10, 11.4, 5.8, 4.11, 2.2, 1.0) or, without ``heads``, in
the order of their single-head ablation damage ``LD_clean − LD(only h ablated)`` (mean over
letters and prompts), the ``max_heads`` most damaging ones.

Reported per step k: ``LD_i`` (mean ± std over prompts) with the first k heads kept; and
``recovered = (LD_K − LD_0) / (LD_clean − LD_0)`` (mean over letters; 1 = the kept heads
alone give the clean performance); ``circuit_removed_ld``: only the K circuit heads ablated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from kdcore import hookimpl
from kdcore.probe import ProbeError, head_name, parse_heads

from .acronyms import AcronymProbe, stats_of


class CircuitAblation(AcronymProbe):
    """Cumulative mean-ablation; see the module docstring.

    heads: the circuit in order, ``["8.11", "9.9", ...]``; none = rank heads by ablation damage.
    max_heads: how many ranked heads to add when ``heads`` is not given.
    """

    name = "circuit_ablation"

    def __init__(self, n_prompts: int = 32, seed: int = 0, words: Optional[str] = None, batch_size: int = 256,
                 heads: Optional[List[str]] = None, max_heads: int = 8):
        super().__init__(n_prompts, seed, words, batch_size)
        if max_heads < 1:
            raise ProbeError(f"max_heads must be at least 1, got {max_heads}")
        self.heads, self.max_heads = heads, max_heads

    def run(self, model, tokenizer, progress: bool = False) -> Dict[str, Any]:
        sites, prompts, _, clean = self.prepare(model, tokenizer)
        L, H = sites.n_layers, sites.n_heads
        mean_z = self.mean_z(sites, prompts.corrupted(self.seed + 1))

        def values(site, layer):
            return mean_z[layer]

        damage = None
        if self.heads:
            order = parse_heads(self.heads, L, H, where=f"probe {self.name}: heads")
        else:
            ld = self.run_variants(sites, prompts, self.single_variants("z", L, H), values, progress, "single-head ablation")
            damage = (clean.mean() - ld.mean((1, 2))).reshape(L, H)
            ranked = torch.argsort(damage.flatten(), descending=True)[: self.max_heads].tolist()
            order = [(i // H, i % H) for i in ranked]
        variants = [self.ablation_variant(sites, order[:k]) for k in range(len(order) + 1)]
        removed = {}
        for layer, head in order:  # only the circuit ablated, everything else intact
            removed.setdefault(("z", layer), torch.zeros(H, dtype=torch.bool))[head] = True
        ld = self.run_variants(sites, prompts, variants + [removed], values, progress, "cumulative ablation")
        cumulative, circuit_removed = ld[:-1], ld[-1]
        clean_m, none_m, full_m = float(clean.mean()), float(cumulative[0].mean()), float(cumulative[-1].mean())
        recovered = (full_m - none_m) / (clean_m - none_m) if abs(clean_m - none_m) > 1e-9 else float("nan")
        return {
            "probe": self.name, "model": {"layers": L, "heads": H, "head_dim": sites.head_dim},
            "prompts": prompts.stats, "examples": prompts.texts[:5], "clean_ld": stats_of(clean),
            "order": [head_name(l, h) for l, h in order], "given_heads": bool(self.heads),
            "damage": damage.tolist() if damage is not None else None,
            "cumulative": [{"kept": [head_name(l, h) for l, h in order[:k]], "ld": stats_of(cumulative[k])}
                           for k in range(len(order) + 1)],
            "circuit_removed_ld": stats_of(circuit_removed),
            "summary": {"ld": clean_m, "ablated_ld": none_m, "circuit_ld": full_m,
                        "circuit_removed_ld": float(circuit_removed.mean()), "recovered": recovered},
        }

    def plot(self, result: Dict[str, Any], out_dir: Path, label: str) -> List[Path]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = ["none"] + [f"+{h}" for h in result["order"]]
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
        for i, ax in enumerate(axes):
            mean = [c["ld"]["mean"][i] for c in result["cumulative"]]
            std = [c["ld"]["std"][i] for c in result["cumulative"]]
            ax.errorbar(range(len(steps)), mean, yerr=std, marker="o", capsize=3)
            ax.axhline(result["clean_ld"]["mean"][i], linestyle="--", color="gray", label="clean")
            ax.set_xticks(range(len(steps)), steps, rotation=60, fontsize=7)
            ax.set_title(f"letter {i + 1}")
            ax.set_ylabel("logit difference")
        axes[0].legend()
        fig.suptitle(f"{label}: cumulative circuit (all other heads mean-ablated)")
        fig.tight_layout()
        path = Path(out_dir) / f"{label}_circuit_ablation.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return [path]

    def compare(self, results: Dict[str, Dict[str, Any]], layer_maps: Dict[str, Optional[List[int]]]) -> str:
        lines = ["| model | heads added (in order) | clean LD | all ablated | circuit only | circuit removed | recovered |",
                 "| --- | --- | --- | --- | --- | --- | --- |"]
        for label, r in results.items():
            s = r["summary"]
            # a model that does not do the task (clean LD about the all-ablated LD) has no
            # meaningful recovered fraction: the denominator is noise
            rec = f"{s['recovered']:.2f}" if s["ld"] - s["ablated_ld"] >= 0.5 else "n/a (clean LD not above all-ablated)"
            lines.append(f"| {label} | {', '.join(r['order'])} | {s['ld']:.2f} | {s['ablated_ld']:.2f} | "
                         f"{s['circuit_ld']:.2f} | {s['circuit_removed_ld']:.2f} | {rec} |")
        return "\n".join(lines) + "\n"


@hookimpl
def kdcore_register_probes(register):
    register(CircuitAblation)
