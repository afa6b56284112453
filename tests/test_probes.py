"""Circuit probes: hook sites, acronym prompts, patching and ablation on a tiny trained model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _acronym_tiny import acronym_tokenizer, train_acronym_model, words_file  # noqa: E402

from kdcore.probe import Edit, ModelSites, ProbeError, parse_heads  # noqa: E402
from kdcore_plugins.probes.acronyms import (Acronyms, build_prompts, logit_diff,  # noqa: E402
                                            scheme_positions)
from kdcore_plugins.probes.activation_patching import ActivationPatching  # noqa: E402
from kdcore_plugins.probes.circuit_ablation import CircuitAblation  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("acronym")
    model, tok, words = train_acronym_model(root, steps=300, seed=0)
    return model, tok, str(words), root


def test_logit_diff_matches_hand_computation():
    logits = torch.full((1, 3, 10), -1.0)
    capitals = torch.tensor([4, 5, 6, 7])
    answers = torch.tensor([[4, 5, 6]])
    logits[0, 0, [4, 5, 6, 7]] = torch.tensor([3.0, 1.0, 2.5, 0.0])  # 3.0 - 2.5
    logits[0, 1, [4, 5, 6, 7]] = torch.tensor([2.0, 1.0, 0.0, 4.0])  # 1.0 - 4.0
    logits[0, 2, [4, 5, 6, 7]] = torch.tensor([0.0, 0.0, 0.5, 0.5])  # 0.5 - 0.5
    logits[0, 2, 9] = 100.0  # not a capital: ignored
    assert logit_diff(logits, answers, capitals).tolist() == [[0.5, -3.0, 0.0]]


def test_prompts_respect_the_tokenizer_constraints(tmp_path):
    tok = acronym_tokenizer(tmp_path / "tok")
    words = words_file(tmp_path / "words.txt")
    p = build_prompts(tok, n=20, seed=3, words=str(words))
    assert p.tokens.shape == (20, 11) and p.answers.shape == (20, 3)
    assert p.stats["acronyms_admissible"] == p.stats["acronyms_checked"] == 26 ** 3
    for row, answer, text in zip(p.tokens.tolist(), p.answers.tolist(), p.texts):
        pieces = [tok.convert_ids_to_tokens(i) for i in row]
        assert pieces[0] == "<bos>" and pieces[1] == "The" and pieces[8] == " ("
        acronym = text.rsplit("(", 1)[1]
        for i in range(3):  # C_i is " X" of the acronym's letter, A_i is "X"
            assert pieces[2 + 2 * i] == " " + acronym[i]
            assert tok.convert_ids_to_tokens(answer[i]) == acronym[i]
        assert row[9:11] == answer[:2]
    assert build_prompts(tok, n=20, seed=3, words=str(words)).texts == p.texts  # seeded


def test_gpt2_style_tokenizer_rejects_single_token_words(tmp_path):
    """A byte-level BPE that merges whole words admits only the words it splits as [' X', rest]."""
    from kdcore.tiny import train_byte_bpe

    texts = ["The Apple Basket (AB"] * 50 + ["The Zqxj Zqxw (ZZ"]
    tok = train_byte_bpe(texts, tmp_path / "bpe", vocab_size=300)
    words = tmp_path / "w.txt"
    words.write_text("apple\nbasket\n")
    with pytest.raises(ProbeError, match="admits no acronym prompts"):
        build_prompts(tok, n=4, words=str(words))


def test_corruption_schemes():
    assert scheme_positions("current_word", 2) == [4, 5]
    assert scheme_positions("previous_words", 3) == [0, 1, 2, 3, 4, 5]
    assert scheme_positions("previous_letters", 3) == [8, 9, 10]
    with pytest.raises(ProbeError, match="unknown corruption scheme"):
        scheme_positions("nope", 1)


def test_patching_with_own_activations_changes_nothing(trained):
    model, tok, words, _ = trained
    p = build_prompts(tok, n=8, words=words)
    sites = ModelSites(model)
    clean, rec = sites.forward(p.tokens, last=3, record_z=range(2), record_resid=range(2))
    mask_z = torch.ones(8, sites.n_heads, dtype=torch.bool)
    mask_r = torch.ones(8, 11, dtype=torch.bool)
    edits = [Edit("z", 0, rec.z[0], mask_z), Edit("z", 1, rec.z[1], mask_z), Edit("resid", 1, rec.resid[1], mask_r)]
    patched, _ = sites.forward(p.tokens, edits, last=3)
    torch.testing.assert_close(patched, clean, rtol=0, atol=1e-5)


def test_patching_the_whole_input_residual_reproduces_the_corrupted_run(trained):
    """Noising resid_pre of layer 0 at every position = running the corrupted prompts."""
    model, tok, words, _ = trained
    p = build_prompts(tok, n=8, words=words)
    sites = ModelSites(model)
    corrupt = p.corrupted(1)
    expected, rec = sites.forward(corrupt, last=3, record_resid=[0])
    patched, _ = sites.forward(p.tokens, [Edit("resid", 0, rec.resid[0], torch.ones(8, 11, dtype=torch.bool))], last=3)
    torch.testing.assert_close(patched, expected, rtol=0, atol=1e-5)


def test_identical_clean_and_corrupt_inputs_give_zero_effect(trained):
    """previous_words for letter 1 changes no token: the pair is skipped; on letter 2 with a
    single repeated prompt every corruption is the prompt itself, so all effects are 0."""
    model, tok, words, root = trained
    same = root / "one_word.txt"
    same.write_text("apple\n")  # every prompt is "The Apple Apple Apple (AAA"
    r = ActivationPatching(n_prompts=4, words=str(same), letters=[1, 2, 3], resid=True, top_k=2).run(model, tok)
    for per_letter in list(r["heads"]["current_word"].values()) + list(r["resid"]["current_word"].values()):
        assert torch.tensor(per_letter).abs().max() < 1e-5


def test_the_probe_recovers_the_circuit_of_a_trained_model(trained):
    model, tok, words, _ = trained
    acc = Acronyms(n_prompts=64, words=words).run(model, tok)
    assert acc["summary"]["accuracy"] > 0.95 and acc["summary"]["ld"] > 3
    ab = CircuitAblation(n_prompts=64, words=words, max_heads=4).run(model, tok)
    s = ab["summary"]
    assert s["ablated_ld"] < 0 < s["ld"]  # ablating every head destroys the metric
    # the found circuit (half of the 8 heads) carries the task: ablating it hurts far more
    # than ablating the other half, and keeping only it beats keeping nothing
    assert s["circuit_removed_ld"] < s["circuit_ld"]
    assert s["circuit_ld"] > s["ablated_ld"] + 0.5 * (s["ld"] - s["ablated_ld"])
    given = CircuitAblation(n_prompts=64, words=words, heads=ab["order"]).run(model, tok)
    for stat in ("mean", "std"):  # per-letter lists (pytest >= 9.2 refuses nested approx)
        assert given["cumulative"][-1]["ld"][stat] == pytest.approx(ab["cumulative"][-1]["ld"][stat], abs=1e-4)
    ap = ActivationPatching(n_prompts=32, words=words, top_k=4).run(model, tok)
    top = {h["head"] for h in ap["top_heads"]}
    assert len(top & set(ab["order"])) >= 2  # two independent rankings agree on the carriers
    assert all(v <= 0 for v in ap["corrupted_ld"]["current_word"].values())  # corrupting the word kills LD


def test_bad_probe_input():
    with pytest.raises(ProbeError, match="LAYER.HEAD"):
        parse_heads(["8-11"], 12, 12)
    with pytest.raises(ProbeError, match="does not exist"):
        parse_heads(["12.0"], 12, 12)
    with pytest.raises(ProbeError, match="n_prompts"):
        Acronyms(n_prompts=1)
    with pytest.raises(ProbeError, match="schemes"):
        ActivationPatching(schemes=["bogus"])
    with pytest.raises(ProbeError, match="letters"):
        ActivationPatching(letters=[4])


def _kd_probe(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "kdcore.probe_cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


def test_kd_probe_cli_writes_numbers_heatmaps_and_comparison(trained, tmp_path):
    _, _, words, root = trained
    out = tmp_path / "out"
    r = _kd_probe("--model", str(root / "model"), "--model", str(root / "model"), "--probe", "activation_patching",
                  "--probe", "circuit_ablation", "--set", f"words={words}", "--set", "n_prompts=8", "--set", "resid=true",
                  "--no-progress", "--out", str(out))
    assert r.returncode == 0, r.stderr
    data = json.loads((out / "activation_patching" / "model.json").read_text())
    assert len(data["heads"]["current_word"]["3"]) == 2 and len(data["heads"]["current_word"]["3"][0]) == 4
    assert (out / "activation_patching" / "model_heads_current_word.png").stat().st_size > 1000
    assert (out / "circuit_ablation" / "model_circuit_ablation.png").is_file()
    assert "top-8 circuit LD" in (out / "comparison.md").read_text()


@pytest.mark.parametrize("args,message", [
    (["--model", "/nonexistent/model", "--probe", "acronyms"], "model directory not found"),
    (["--model", "x", "--probe", "nope"], "unknown probe 'nope'"),
    (["--model", "x", "--probe", "acronyms", "--set", "top_k=3"], "no chosen probe has the parameter"),
])
def test_kd_probe_bad_input_is_one_error(args, message):
    r = _kd_probe(*args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_kd_probe_tokenizer_without_prompts_is_one_error(tiny_dir, tmp_path):
    words = tmp_path / "w.txt"
    words.write_text("zzzzqqq\n")
    r = _kd_probe("--model", str(tiny_dir / "student"), "--probe", "acronyms", "--set", f"words={words}",
                  "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "admits no acronym prompts" in r.stderr and "Traceback" not in r.stderr


def test_probes_run_at_each_evaluation_of_a_training_run(trained, tmp_path, monkeypatch):
    """eval.probes: a built-in and a third-party probe run on the student at each evaluation
    (and the built-in once on the teacher); metrics in metrics.jsonl and TensorBoard, results
    in the run directory."""
    import yaml

    from kdcore.cli import main
    from kdcore.registry import reset_registry

    _, _, words, root = trained
    monkeypatch.syspath_prepend(str(FIXTURES / "local_plugins"))
    out = tmp_path / "run"
    cfg = {"schema_version": 1, "plugins": ["kdcore_head_norm_probe"], "run": {"output_dir": str(out), "seed": 1},
           "teacher": {"path": str(root / "model")}, "student": {"path": str(root / "model")},
           "task": {"name": "instruction", "data_dir": str(Path(__file__).parents[1] / "data" / "kdcore-instruct"),
                    "max_length": 64, "max_prompt_length": 48, "max_examples": 8},
           "objective": {"kd_weight": 0.5},
           "train": {"max_steps": 2, "micro_batch_size": 4, "lr": 1e-4, "eval_every": 1, "eval_at_start": False},
           "eval": {"max_examples": 4, "probes": [{"name": "acronyms", "words": words, "n_prompts": 8},
                                                  {"name": "head_norm", "words": words}]}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    try:
        assert main(["--config", str(path)]) == 0
    finally:
        sys.modules.pop("kdcore_head_norm_probe", None)
        reset_registry()
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["split"] == "eval"]
    assert len(evals) >= 2 and all("probe/acronyms/ld" in r and "probe/head_norm/max_norm" in r for r in evals)
    assert evals[0]["probe/acronyms/accuracy"] > 0.9  # the trained acronym model, barely changed
    assert (out / "probes" / "acronyms" / "teacher.json").is_file()
    assert not (out / "probes" / "head_norm" / "teacher.json").exists()
    assert (out / "probes" / "head_norm" / "student-step000001.json").is_file()
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert [p["name"] for p in resolved["eval"]["probes"]] == ["acronyms", "head_norm"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    assert "eval/probe/acronyms/ld" in acc.Tags()["scalars"]


def test_shipped_probe_files_are_valid():
    """configs/probes/*.yaml: models and probes that build (the GPT-2 one names the paper's circuit)."""
    from kdcore.probe_cli import build_probes, read_probe_file

    files = sorted((Path(__file__).parents[1] / "configs" / "probes").glob("*.yaml"))
    assert files
    for path in files:
        models, params = read_probe_file(str(path))
        probes = build_probes(list(params), [], params)
        assert models and probes
    models, params = read_probe_file(str(files[0]))
    assert params["circuit_ablation"]["heads"] == ["8.11", "9.9", "10.10", "11.4", "5.8", "4.11", "2.2", "1.0"]


def test_kd_probe_config_student_spec_maps_layers(trained, tmp_path):
    """CONFIG.yaml:student loads the student as kd-train would (cut by keep_layers) and the
    comparison maps its layers to the teacher's."""
    import yaml

    _, _, words, root = trained
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump({"student": {"path": str(root / "model"), "keep_layers": [1]}}))
    out = tmp_path / "out"
    r = _kd_probe("--model", str(root / "model"), "--model", f"{cfg}:student", "--probe", "activation_patching",
                  "--set", f"words={words}", "--set", "n_prompts=4", "--set", "top_k=2", "--no-progress",
                  "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "activation_patching" / "exp-student.json").read_text())["model"]["layers"] == 1
    assert "student layer l = teacher layer 0→1" in (out / "comparison.md").read_text()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_head_sites_match_weight_surgery(tmp_path, arch):
    """GPT-2 (Conv1D attn.c_proj, weight [in, out]) and Llama (Linear o_proj, weight [out, in]):
    zeroing one head's z equals zeroing that head's inputs in the projection weight."""
    from kdcore.tiny import tiny_causal_lm

    tok = acronym_tokenizer(tmp_path / "tok")
    model = tiny_causal_lm(tok, None, arch=arch, hidden=32, layers=2, heads=4, seed=5).eval()
    p = build_prompts(tok, n=4, words=str(words_file(tmp_path / "w.txt")))
    sites = ModelSites(model)
    assert (sites.n_layers, sites.n_heads, sites.head_dim) == (2, 4, 8)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[:, 2] = True
    patched, _ = sites.forward(p.tokens, [Edit("z", 1, torch.zeros(11, 4, 8), mask)], last=3)
    with torch.no_grad():
        if arch == "gpt2":
            model.transformer.h[1].attn.c_proj.weight[16:24] = 0  # Conv1D weight [in, out]: head 2's inputs
        else:
            model.model.layers[1].self_attn.o_proj.weight[:, 16:24] = 0
        expected = model(input_ids=p.tokens).logits[:, -3:].float()
    torch.testing.assert_close(patched, expected, rtol=0, atol=1e-5)
