"""kd-eval: ROUGE-L, post-processing, seeded generation, the evaluation outputs and CLI errors."""

from __future__ import annotations

import json

import pytest
from rouge_score import rouge_scorer

from kdcore.eval_cli import main
from kdcore.evaluate import evaluate, load_dskd_test_dir, rouge_l_of
from kdcore.generate import GenerationSettings, generate
from kdcore.rouge import corpus_rouge_l, postprocess, rouge_l, rouge_l_scores
from kdcore.task import Example

PAIRS = [  # (prediction, reference)
    ("The cat sat on the mat.", "A cat was sitting on the mat"),
    ("Paris is the capital of France.", "The capital of France is Paris."),
    ("running dogs", "the dog runs"),
    ("", "something"),
    ("Completely unrelated words here", "Nothing in common at all"),
]


def expected_f(prediction, reference):
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return scorer.score(reference, prediction)["rougeL"].fmeasure


def test_rouge_l_equals_rouge_score():
    for pred, ref in PAIRS:
        assert rouge_l(pred, ref) == pytest.approx(expected_f(pred, ref), abs=1e-12)
    preds, refs = [p for p, _ in PAIRS], [r for _, r in PAIRS]
    expected = 100 * sum(expected_f(p, r) for p, r in PAIRS) / len(PAIRS)
    assert corpus_rouge_l(preds, refs) == pytest.approx(expected)


def test_rouge_l_hand_computed():
    # 6 tokens each; LCS "the cat on the mat" = 5 -> P = R = F = 5/6
    assert rouge_l("the cat lay on the mat", "the cat sat on the mat") == pytest.approx(5 / 6)
    # prediction 2 tokens, reference 4, LCS 2 ("a b"): P = 1, R = 1/2, F = 2/3
    assert rouge_l("a b", "a x b y") == pytest.approx(2 / 3)
    # stemming: cats/cat, running/run
    assert rouge_l("cats running", "cat run") == pytest.approx(1.0)
    # case and punctuation are ignored by rouge_score's tokenizer
    assert rouge_l("Hello, World!", "hello world") == pytest.approx(1.0)


def test_rouge_l_max_over_references():
    refs = ["nothing alike", "the cat sat on the mat", "a cat"]
    pred = "the cat sat on a mat"
    best = max(expected_f(pred, r) for r in refs)
    assert rouge_l(pred, refs) == pytest.approx(best)
    assert rouge_l(pred, refs) > rouge_l(pred, refs[0])
    assert rouge_l_scores([pred, "x"], [refs, "x"]) == pytest.approx([best, 1.0])


def test_postprocess():
    assert postprocess("  an answer \n<|endoftext|> junk<|endoftext|>more") == "an answer"
    assert postprocess("\n no marker \t") == "no marker"
    assert postprocess("<|endoftext|>after") == ""
    assert postprocess(postprocess(" a <|endoftext|>b")) == "a"


def test_score_file(tmp_path, capsys):
    path = tmp_path / "preds.jsonl"
    lines = [{"prediction": "the cat sat<|endoftext|>ignored", "references": ["the cat sat on the mat", "a dog"]},
             {"prediction": " Paris ", "references": "paris"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert main(["--score", str(path)]) == 0
    expected = 100 * (expected_f("the cat sat", "the cat sat on the mat") + 1.0) / 2
    out = capsys.readouterr().out
    assert f"ROUGE-L {expected:.2f} (2 examples)" in out


def test_score_file_errors(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prediction": "a", "references": ["a"]}) + "\n" + json.dumps({"prediction": "a"}) + "\n")
    assert main(["--score", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:2" in err and "references" in err and "Traceback" not in err
    assert main(["--score", str(tmp_path / "missing.jsonl")]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.fixture(scope="module")
def student(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_dir / "student"), AutoTokenizer.from_pretrained(tiny_dir / "student")


PROMPTS = ["### Instruction:\nName a fruit.\n\n### Response:\n",
           "Below is an instruction.\n\n### Instruction:\nWrite a longer answer about the sea and ships.\n\n### Response:\n",
           "Hi"]


def test_generation_seeded(student):
    model, tok = student
    settings = GenerationSettings(max_new_tokens=8, batch_size=2)
    a = generate(model, tok, PROMPTS, settings, seed=10, progress=False)
    b = generate(model, tok, PROMPTS, settings, seed=10, progress=False)
    c = generate(model, tok, PROMPTS, settings, seed=20, progress=False)
    assert len(a) == len(PROMPTS) and all(isinstance(x, str) for x in a)
    assert a == b
    assert a != c


def test_greedy_left_padding_matches_single(student):
    model, tok = student
    model.train()
    settings = GenerationSettings.greedy(max_new_tokens=6, batch_size=3)
    batched = generate(model, tok, PROMPTS, settings, seed=1, progress=False)
    single = [generate(model, tok, [p], settings, seed=2, progress=False)[0] for p in PROMPTS]
    assert batched == single
    assert model.training  # the caller's mode is restored


def test_rouge_l_of(student):
    model, tok = student
    examples = [Example(prompt=p, response="an answer") for p in PROMPTS[:2]]
    settings = GenerationSettings.dev(max_length=24, max_prompt_length=16)
    assert settings.max_new_tokens == 8 and settings.no_repeat_ngram_size == 0
    value = rouge_l_of(model, tok, examples, settings, seeds=[1, 2])
    by_seed = [corpus_rouge_l(generate(model, tok, PROMPTS[:2], settings, seed=s, progress=False),
                              [e.references for e in examples]) for s in (1, 2)]
    assert value == pytest.approx(sum(by_seed) / 2)


def write_dskd_layout(root):
    (root / "dolly").mkdir(parents=True)
    (root / "dolly" / "valid.jsonl").write_text("".join(
        json.dumps({"instruction": f"Name animal number {i}.", "input": "", "output": "A cat."}) + "\n" for i in range(3)))
    (root / "sinst" / "11_").mkdir(parents=True)
    (root / "sinst" / "11_" / "valid.jsonl").write_text("".join(
        json.dumps({"prompt": f"Translate item {i}.<n>### Response:<n>", "output": ["one answer", "another answer"]}) + "\n"
        for i in range(4)))


def test_dskd_layout(tmp_path):
    write_dskd_layout(tmp_path)
    sets = load_dskd_test_dir(tmp_path, limit=2)
    assert list(sets) == ["dolly", "sinst"]
    assert len(sets["dolly"]) == 2 and len(sets["sinst"]) == 2
    assert sets["sinst"][0].references == ["one answer", "another answer"]
    assert "\n### Response:\n" in sets["sinst"][0].prompt


def test_kd_eval_writes_outputs(tiny_dir, tmp_path, capsys):
    write_dskd_layout(tmp_path / "data")
    out = tmp_path / "out"
    rc = main(["--model", str(tiny_dir / "student"), "--test-dir", str(tmp_path / "data"), "--test", "kdcore",
               "--seeds", "10", "20", "--max-new-tokens", "8", "--max-examples", "3", "--batch-size", "2",
               "--out", str(out), "--no-progress"])
    assert rc == 0
    for name in ("dolly", "sinst", "kdcore"):
        for seed in (10, 20):
            lines = (out / "predictions" / f"{name}_seed{seed}.jsonl").read_text().splitlines()
            assert len(lines) == 3
            rec = json.loads(lines[0])
            assert set(rec) == {"prompt", "prediction", "references", "rougeL"}
            assert isinstance(rec["references"], list) and 0 <= rec["rougeL"] <= 100
    results = json.loads((out / "results.json").read_text())
    assert results["protocol"]["seeds"] == [10, 20]
    assert results["protocol"]["generation"]["do_sample"] is True
    assert results["protocol"]["generation"]["no_repeat_ngram_size"] == 6
    (row,) = results["models"]
    assert row["model"] == str(tiny_dir / "student")
    assert list(row["sets"]) == ["dolly", "sinst", "kdcore"]
    for stats in row["sets"].values():
        assert stats["n"] == 3 and set(stats["per_seed"]) == {"10", "20"}
        assert stats["mean"] == pytest.approx(sum(stats["per_seed"].values()) / 2)
        assert stats["std"] >= 0
    assert row["avg"]["mean"] == pytest.approx(sum(s["mean"] for s in row["sets"].values()) / 3)
    # the per-set score equals the mean of the per-example scores in the predictions file
    recs = [json.loads(x) for x in (out / "predictions" / "sinst_seed20.jsonl").read_text().splitlines()]
    assert row["sets"]["sinst"]["per_seed"]["20"] == pytest.approx(sum(r["rougeL"] for r in recs) / 3)
    table = (out / "results.md").read_text().splitlines()
    assert table[0] == "| Model | dolly | sinst | kdcore | Avg |"
    assert table[2].startswith(f"| {tiny_dir / 'student'} | ") and table[2].count("±") == 4
    assert "| Model | dolly" in capsys.readouterr().out


def test_evaluate_function_with_loaded_model(student, tmp_path):
    model, tok = student
    sets = {"a": [Example(prompt=PROMPTS[0], response="x", references=["x", "y"])]}
    row = evaluate(model, tok, sets, seeds=[5], settings=GenerationSettings(max_new_tokens=4),
                   out_dir=tmp_path, name="tiny", progress=False)
    assert row["sets"]["a"]["std"] is None  # one seed: no sample std
    assert (tmp_path / "predictions" / "a_seed5.jsonl").is_file()
    assert "| tiny | " in (tmp_path / "results.md").read_text()


def test_kd_eval_input_errors(tiny_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n{not json\n")
    assert main(["--model", str(tiny_dir / "student"), "--test", f"bad={bad}"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2" in err and "Traceback" not in err

    assert main(["--model", str(tmp_path / "no-such-model"), "--test", "kdcore", "--max-examples", "1"]) == 2
    assert "model directory not found" in capsys.readouterr().err

    assert main(["--model", str(tiny_dir / "student")]) == 2
    assert "--test" in capsys.readouterr().err

    assert main(["--model", str(tiny_dir / "student"), "--test-dir", str(tmp_path / "nowhere")]) == 2
    assert "test directory not found" in capsys.readouterr().err
