"""``kd-probe``: run circuit probes on models and compare them.

    kd-probe --model TEACHER --model STUDENT --probe activation_patching [--probe ...]
             [--set n_prompts=16 ...] [--out DIR] [--dtype float32] [--no-progress]
    kd-probe --list

A model is a hub id, a directory, ``package:NAME[/SUB]``, a GGUF file (``DIR/FILE.gguf`` or
``package:NAME/FILE.gguf``, dequantised once and cached as kd-train does), a kd-train run
directory (its ``final/`` model; the run's ``student.keep_layers`` gives the mapping of the
student's layers to the teacher's), or ``CONFIG.yaml:teacher`` / ``CONFIG.yaml:student`` (the
model exactly as that kd-train config loads it, e.g. the student cut by ``keep_layers`` before
training). The first model is the reference of the comparison.

Writes ``DIR/<probe>/<label>.json`` (the numbers), ``DIR/<probe>/<label>_*.png`` (heatmaps,
curves) and ``DIR/comparison.md``; prints the comparison. Bad input exits 2 with one message.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

from .console import command
from .errors import ConfigError, KdcoreError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kd-probe", description="Run circuit probes (activation patching, circuit "
                                "ablation on the acronym task) on models and compare them.")
    p.add_argument("--model", action="append", default=[], metavar="PATH",
                   help="hub id, directory, package:NAME[/SUB], a .gguf file or a kd-train run directory; repeat")
    p.add_argument("--probe", action="append", default=[], metavar="NAME", help="a registered probe; repeat")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a probe parameter (YAML value) for every probe that has it, e.g. n_prompts=16")
    p.add_argument("--config", metavar="FILE", help="a probe file: models (list), probes ({name: {param: value}}); "
                   "--model and --probe add to it (configs/probes/)")
    p.add_argument("--out", default="runs/probe", metavar="DIR", help="output directory (runs/probe)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--list", action="store_true", help="list the registered probes and exit")
    return p


def model_config(spec: str):
    """(ModelConfig, keep_layers of the run it came from or None, label) for a ``--model``."""
    from .models import ModelConfig, resolve_path

    keep = None
    file, colon, side = spec.rpartition(":")
    if colon and file.endswith((".yaml", ".yml")) and side in ("teacher", "student"):
        from .config import read_yaml

        section = read_yaml(file).get(side)
        if not isinstance(section, dict) or "path" not in section:
            raise ConfigError(f"{file}: no '{side}' section with a path")
        fields = {k: v for k, v in section.items() if k in ModelConfig.__dataclass_fields__}
        cfg = ModelConfig(**fields)
        return cfg, cfg.keep_layers, f"{Path(file).stem}-{side}"
    path = Path(resolve_path(spec))
    if path.is_dir() and (path / "config.yaml").is_file() and (path / "final").is_dir():
        path, spec = path / "final", str(path / "final")
    run_cfg = path.parent / "config.yaml"
    if path.is_dir() and run_cfg.is_file():
        import yaml

        try:
            keep = ((yaml.safe_load(run_cfg.read_text()) or {}).get("student") or {}).get("keep_layers")
        except yaml.YAMLError:
            keep = None
    if spec.endswith(".gguf"):
        parent, _, name = spec.rpartition("/")
        cfg = ModelConfig(path=parent or ".", gguf_file=name)
        label = Path(name).stem
    else:
        cfg = ModelConfig(path=spec)
        label = path.parent.name if path.name == "final" else path.name
    return cfg, keep, label


def probe_kwargs(sets: List[str]) -> dict:
    from .config import parse_override

    out = {}
    for text in sets:
        keys, value = parse_override(text)
        if len(keys) != 1:
            raise ConfigError(f"--set {text!r}: expected KEY=VALUE")
        out[keys[0]] = value
    return out


def read_probe_file(path: str):
    """(models, {probe name: params}) of a ``--config`` probe file."""
    from .config import read_yaml

    data = read_yaml(path, what="probe file", top_level="with models and probes")
    models, probes = data.get("models") or [], data.get("probes") or {}
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise ConfigError(f"{path}: models: expected a list of model paths")
    if not isinstance(probes, dict) or not all(isinstance(v, dict) or v is None for v in probes.values()):
        raise ConfigError(f"{path}: probes: expected a mapping of probe name to its parameters")
    return models, {k: dict(v or {}) for k, v in probes.items()}


def build_probes(names: List[str], sets: List[str], params: Optional[dict] = None):
    from .components import spec
    from .schema import fields_of

    kwargs = probe_kwargs(sets)
    probes = []
    for name in names:
        s = spec("probe", {"name": name}, where=f"--probe {name}")
        fields = fields_of(s.entry.cls)
        node = {"name": name, **(params or {}).get(name, {}), **{k: v for k, v in kwargs.items() if k in fields}}
        probes.append(spec("probe", node, where=f"--probe {name}").build())
    unused = [k for k in kwargs if not any(k in fields_of(type(p)) for p in probes)]
    if unused:
        raise ConfigError(f"--set: no chosen probe has the parameter(s) {', '.join(unused)}")
    return probes


def run(args) -> int:
    from .components import names

    if args.list:
        for name in names("probe"):
            print(name)
        return 0
    file_models, params = read_probe_file(args.config) if args.config else ([], {})
    args.model = file_models + args.model
    args.probe = list(params) + [p for p in args.probe if p not in params]
    if not args.model:
        raise KdcoreError("--model PATH is required (repeat it to compare models)")
    if not args.probe:
        raise KdcoreError(f"--probe NAME is required; probes: {', '.join(names('probe'))}")
    probes = build_probes(args.probe, args.set, params)
    from .evaluate import safe_label
    from .models import load_model, load_tokenizer

    out = Path(args.out)
    results = {p.name: {} for p in probes}
    layer_maps = {}
    specs: List[Tuple[object, Optional[list], str]] = [model_config(m) for m in args.model]
    labels = []
    for cfg, keep, label in specs:
        label = safe_label(label)
        while label in labels:
            label += "_"
        labels.append(label)
        cfg.dtype = args.dtype
        tokenizer, model = load_tokenizer(cfg), load_model(cfg)
        layer_maps[label] = keep
        for probe in probes:
            start = time.time()
            print(f"kd-probe: {probe.name} on {label}", file=sys.stderr)
            result = probe.run(model, tokenizer, progress=not args.no_progress)
            result["seconds"] = round(time.time() - start, 1)
            result["source"] = {"path": cfg.path, "gguf_file": cfg.gguf_file, "keep_layers": keep}
            pdir = out / probe.name
            pdir.mkdir(parents=True, exist_ok=True)
            (pdir / f"{label}.json").write_text(json.dumps(result, indent=1))
            probe.plot(result, pdir, label)
            results[probe.name][label] = result
        del model
    sections = []
    for probe in probes:
        sections.append(f"## {probe.name}\n\n{probe.compare(results[probe.name], layer_maps)}")
    text = "# kd-probe comparison\n\n" + "\n".join(sections)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.md").write_text(text)
    print(text, end="")
    print(f"kd-probe: wrote {out / 'comparison.md'} and per-probe JSON and PNG files", file=sys.stderr)
    return 0


main = command("kd-probe", parser, run)


if __name__ == "__main__":
    sys.exit(main())
