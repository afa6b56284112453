"""Tiny models and tokenizers built locally in seconds, for tests, demos and CI.

Nothing here touches the model hub: tokenizers are trained on local text with ``tokenizers``
and models are randomly initialised from small configs through the Auto classes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, List, Optional

import torch

SPECIALS = ["<|endoftext|>", "<|pad|>"]


def instruction_texts(data_dir) -> List[str]:
    """Every instruction, input and output string of the committed instruction set."""
    texts = []
    for f in sorted(Path(data_dir).glob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rec = json.loads(line)
                texts += [rec.get("instruction", ""), rec.get("input", ""), rec.get("output", "")]
    return [t for t in texts if t]


def train_byte_bpe(texts: Iterable[str], out_dir, vocab_size: int = 512):
    """A byte-level BPE tokenizer (GPT-2 style) trained on ``texts``, saved as an HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIALS[0], bos_token=SPECIALS[0],
                                   unk_token=SPECIALS[0], pad_token=SPECIALS[1])
    fast.save_pretrained(str(out_dir))
    return fast


def tiny_causal_lm(tokenizer, out_dir=None, arch: str = "llama", hidden: int = 32, layers: int = 2,
                   heads: int = 4, vocab_size: Optional[int] = None, seed: int = 0, tie: bool = True):
    """A randomly initialised causal LM (``llama`` or ``gpt2`` layout) sized for CPU tests."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    vocab = vocab_size or len(tokenizer)
    specials = dict(eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1), max_position_embeddings=1024,
                          tie_word_embeddings=tie, **specials)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=1024,
                         tie_word_embeddings=tie, **specials)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    if out_dir is not None:
        model.save_pretrained(str(out_dir))
        tokenizer.save_pretrained(str(out_dir))
    return model
