"""A tiny acronym model trained in seconds: a word-level tokenizer whose pieces are exactly the
acronym template's tokens, and a 2-layer Llama-layout model trained on the task."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ["apple", "anchor", "badger", "basket", "candle", "copper", "dragon", "desert", "engine", "ember",
         "falcon", "forest", "garden", "goblet", "harbor", "hammer", "island", "ivory", "jacket", "jungle",
         "kettle", "kernel", "lantern", "lemon", "marble", "meadow", "needle", "nectar", "orange", "oyster",
         "pepper", "pillow", "quartz", "quiver", "rabbit", "ribbon", "saddle", "silver", "tunnel", "timber",
         "umber", "urchin", "velvet", "violin", "walnut", "willow", "xenon", "yellow", "yonder", "zephyr", "zinc"]


def acronym_tokenizer(out_dir):
    """Pieces: 'The', ' (', ' X', 'X' for every capital, and each word's lowercase rest."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    letters = [chr(ord("A") + i) for i in range(26)]
    vocab = ["<bos>", "<unk>", "<pad>", "The", " ("] + [" " + c for c in letters] + letters
    vocab += sorted({w[1:] for w in WORDS})
    tok = Tokenizer(models.WordLevel({p: i for i, p in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"The| \(| [A-Z]|[A-Z]|[a-z]+|\s+|."), behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<bos>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.save_pretrained(str(out_dir))
    return fast


def words_file(path) -> Path:
    Path(path).write_text("\n".join(WORDS) + "\n")
    return Path(path)


def train_acronym_model(out_dir, steps: int = 300, seed: int = 0, arch: str = "llama"):
    """Train a 2-layer model on acronym prompts (loss on the three letter positions); returns
    (model, tokenizer, words path). About 10 s on 2 CPU cores."""
    from kdcore.tiny import tiny_causal_lm
    from kdcore_plugins.probes.acronyms import build_prompts

    out = Path(out_dir)
    tok = acronym_tokenizer(out / "model")
    words = words_file(out / "words.txt")
    model = tiny_causal_lm(tok, None, arch=arch, hidden=64, layers=2, heads=4, seed=seed)
    data = build_prompts(tok, n=2048, seed=seed + 100, words=str(words))
    ids = torch.cat([data.tokens, data.answers[:, 2:]], 1)  # the full 12-token sequence
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        batch = ids[torch.randint(0, len(ids), (64,))]
        logits = model(input_ids=batch[:, :-1]).logits[:, 8:11]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 9:12].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(str(out / "model"))
    return model, tok, words
