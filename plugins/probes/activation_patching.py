"""``activation_patching``: noising sweeps of the acronym study (seed-methods §3.4).

For each corruption scheme and letter ``i``: run the clean prompts, overwrite one component
with its activation from the partially corrupted run, and report
``effect = mean_n [LD_i(patched) − LD_i(clean)]`` (negative = the component carries letter i).
Sweeps: every head's output ``z[l, h]`` at all positions (``[L, H]``) and, with ``resid: true``,
the residual stream entering layer ``l`` at position ``p`` (``[L, 11]``).

Heads are ranked by importance ``= −mean`` of their effect over the (scheme, letter) pairs run
(pairs that change no token, e.g. ``previous_words`` for letter 1, are run, have effect 0 and
are left out of the ranking: ``noop_pairs``). The top-k
circuit's logit difference is measured by mean-ablating every other head (§3.6).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from kdcore import hookimpl
from kdcore.probe import ProbeError, head_name

from .acronyms import SCHEMES, SEQ_LEN, AcronymProbe, logit_diff, stats_of


class ActivationPatching(AcronymProbe):
    """Per-head (and residual-by-position) activation patching; see the module docstring.

    schemes: corruption schemes to run (``current_word``, ``previous_words``, ``previous_letters``).
    letters: which acronym letters (1, 2, 3). resid: also sweep the residual stream.
    top_k: heads in the reported circuit.
    """

    name = "activation_patching"

    def __init__(self, n_prompts: int = 32, seed: int = 0, words: Optional[str] = None, batch_size: int = 256,
                 schemes: List[str] = ("current_word",), letters: List[int] = (1, 2, 3), resid: bool = False,
                 top_k: int = 8):
        super().__init__(n_prompts, seed, words, batch_size)
        bad = [s for s in schemes if s not in SCHEMES]
        if bad or not schemes:
            raise ProbeError(f"schemes: unknown or empty {bad or list(schemes)}; schemes: {', '.join(SCHEMES)}")
        if not letters or any(i not in (1, 2, 3) for i in letters):
            raise ProbeError(f"letters: expected a non-empty subset of [1, 2, 3], got {list(letters)}")
        if top_k < 1:
            raise ProbeError(f"top_k must be at least 1, got {top_k}")
        self.schemes, self.letters, self.resid, self.top_k = list(schemes), sorted(set(letters)), resid, top_k

    def run(self, model, tokenizer, progress: bool = False) -> Dict[str, Any]:
        sites, prompts, _, clean = self.prepare(model, tokenizer)
        L, H = sites.n_layers, sites.n_heads
        corrupt = prompts.corrupted(self.seed + 1)
        heads: Dict[str, Dict[str, list]] = {}
        resid: Dict[str, Dict[str, list]] = {}
        corrupted_ld: Dict[str, Dict[str, float]] = {}
        effects, noops = [], []
        for scheme in self.schemes:
            for letter in self.letters:
                partial = prompts.partially_corrupted(scheme, letter, corrupt)
                # a pair that changes no token (previous_words for letter 1) still runs (its
                # effects are 0) but does not rank heads
                noop = torch.equal(partial, prompts.tokens)
                if noop:
                    noops.append(f"{scheme}:{letter}")
                _, rec = sites.forward(partial, last=1, record_z=range(L), record_resid=range(L) if self.resid else ())
                logits, _ = sites.forward(partial, last=3)
                corrupted_ld.setdefault(scheme, {})[str(letter)] = float(
                    logit_diff(logits, prompts.answers, prompts.capitals)[:, letter - 1].mean())

                def values(site, layer, rec=rec):
                    return rec.z[layer] if site == "z" else rec.resid[layer]

                variants = self.single_variants("z", L, H)
                ld = self.run_variants(sites, prompts, variants, values, progress, f"{scheme} letter {letter} heads")
                effect = (ld[:, :, letter - 1] - clean[None, :, letter - 1]).mean(1).reshape(L, H)
                heads.setdefault(scheme, {})[str(letter)] = effect.tolist()
                if not noop:
                    effects.append(effect)
                if self.resid:
                    variants = self.single_variants("resid", L, SEQ_LEN)
                    ld = self.run_variants(sites, prompts, variants, values, progress, f"{scheme} letter {letter} resid")
                    r = (ld[:, :, letter - 1] - clean[None, :, letter - 1]).mean(1).reshape(L, SEQ_LEN)
                    resid.setdefault(scheme, {})[str(letter)] = r.tolist()
        importance = -torch.stack(effects).mean(0) if effects else torch.zeros(L, H)  # [L, H]
        order = torch.argsort(importance.flatten(), descending=True)[: self.top_k].tolist()
        top = [(i // H, i % H) for i in order]
        mean_z = self.mean_z(sites, corrupt)
        ablated = self.run_variants(sites, prompts, [self.ablation_variant(sites, top), self.ablation_variant(sites, [])],
                                    lambda site, layer: mean_z[layer])
        clean_mean = clean.mean(0)
        circuit, none = ablated[0], ablated[1]
        return {
            "probe": self.name, "model": {"layers": L, "heads": H, "head_dim": sites.head_dim},
            "prompts": prompts.stats, "examples": prompts.texts[:5], "schemes": self.schemes, "letters": self.letters,
            "noop_pairs": noops,
            "clean_ld": stats_of(clean), "corrupted_ld": corrupted_ld, "heads": heads, "resid": resid,
            "importance": importance.tolist(),
            "top_heads": [{"head": head_name(l, h), "importance": float(importance[l, h])} for l, h in top],
            "circuit": {"heads": [head_name(l, h) for l, h in top], "ld": stats_of(circuit), "ablated_ld": stats_of(none)},
            "summary": {"ld": float(clean_mean.mean()), "circuit_ld": float(circuit.mean()),
                        "ablated_ld": float(none.mean()), "top_importance": float(importance[top[0]])},
        }

    def plot(self, result: Dict[str, Any], out_dir: Path, label: str) -> List[Path]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        paths = []
        for kind, table in (("heads", result["heads"]), ("resid", result["resid"])):
            for scheme, per_letter in table.items():
                letters = sorted(per_letter)
                fig, axes = plt.subplots(1, len(letters), figsize=(max(6.5, 4.2 * len(letters)), 3.8), squeeze=False)
                for ax, letter in zip(axes[0], letters):
                    data = torch.tensor(per_letter[letter])
                    lim = float(data.abs().max()) or 1.0
                    im = ax.imshow(data.numpy(), cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
                    ax.set_title(f"letter {letter}")
                    ax.set_xlabel("head" if kind == "heads" else "position")
                    ax.set_ylabel("layer")
                    fig.colorbar(im, ax=ax, shrink=0.8)
                fig.suptitle(f"{label}: {kind} patching, {scheme} (LD patched − clean)", fontsize=9)
                fig.tight_layout()
                path = Path(out_dir) / f"{label}_{kind}_{scheme}.png"
                fig.savefig(path, dpi=110)
                plt.close(fig)
                paths.append(path)
        return paths

    def compare(self, results: Dict[str, Dict[str, Any]], layer_maps: Dict[str, Optional[List[int]]]) -> str:
        def fmt(values):
            return " / ".join(f"{v:.2f}" for v in values)

        lines = [f"| model | layers x heads | clean LD (letters 1/2/3) | top-{self.top_k} circuit LD | all heads ablated LD "
                 "| top heads |", "| --- | --- | --- | --- | --- | --- |"]
        for label, r in results.items():
            lines.append(f"| {label} | {r['model']['layers']} x {r['model']['heads']} | {fmt(r['clean_ld']['mean'])} "
                         f"| {fmt(r['circuit']['ld']['mean'])} | {fmt(r['circuit']['ablated_ld']['mean'])} "
                         f"| {', '.join(r['circuit']['heads'])} |")
        labels = list(results)
        reference = results[labels[0]]
        for label in labels[1:]:
            keep = layer_maps.get(label)
            if not keep:
                continue
            r = results[label]
            lines += ["", f"**{label}** was cut from **{labels[0]}**: student layer l = teacher layer "
                      + ", ".join(f"{i}→{t}" for i, t in enumerate(keep)), "",
                      f"| {labels[0]} top head | importance | layer kept? | {label} head | its importance | rank |",
                      "| --- | --- | --- | --- | --- | --- |"]
            imp = torch.tensor(r["importance"])
            ranks = torch.argsort(torch.argsort(imp.flatten(), descending=True)).reshape(imp.shape) + 1
            mapped_top = set()
            for item in reference["top_heads"]:
                tl, th = map(int, item["head"].split("."))
                if tl in keep and th < imp.shape[1]:
                    sl = keep.index(tl)
                    mapped_top.add((sl, th))
                    lines.append(f"| {item['head']} | {item['importance']:.3f} | yes | {sl}.{th} | "
                                 f"{float(imp[sl, th]):.3f} | {int(ranks[sl, th])} |")
                else:
                    lines.append(f"| {item['head']} | {item['importance']:.3f} | no | - | - | - |")
            own = {tuple(map(int, h.split("."))) for h in r["circuit"]["heads"]}
            lines += ["", f"Overlap of the student's top-{self.top_k} with the kept teacher top heads: "
                      f"{len(own & mapped_top)} of {len(mapped_top)}."]
        return "\n".join(lines) + "\n"


@hookimpl
def kdcore_register_probes(register):
    register(ActivationPatching)
