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


def train_sentencepiece_bpe(texts: Iterable[str], out_dir, vocab_size: int = 800):
    """A SentencePiece BPE tokenizer (Llama/Mistral style, ``▁`` word boundaries, byte fallback)
    trained on ``texts``, saved as an HF tokenizer (``LlamaTokenizer``, whose ids match
    sentencepiece's for BPE models)."""
    import io

    import sentencepiece as spm
    from transformers import LlamaTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([t for t in texts if t.strip()]), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=2, minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(model.getvalue())
    tok = LlamaTokenizer.from_pretrained(str(out))
    tok.save_pretrained(str(out))
    return tok


def make_tiny_pair(out_dir, data_dir) -> dict:
    """Build a tiny cross-tokenizer pair in seconds: ``teacher`` (GPT-2 layout, byte-level BPE
    1,024 tokens), ``student`` (Llama layout, SentencePiece BPE 800 tokens) and ``student_same``
    (Llama layout with the teacher's tokenizer, for same-tokenizer methods). Returns the paths."""
    out = Path(out_dir)
    texts = instruction_texts(data_dir)
    bpe = train_byte_bpe(texts, out / "tokenizer-bpe", vocab_size=1024)
    spm_tok = train_sentencepiece_bpe(texts, out / "tokenizer-spm", vocab_size=800)
    paths = {"teacher": out / "teacher", "student": out / "student", "student_same": out / "student_same"}
    tiny_causal_lm(bpe, paths["teacher"], arch="gpt2", hidden=64, layers=2, heads=4, seed=11)
    tiny_causal_lm(spm_tok, paths["student"], arch="llama", hidden=32, layers=2, heads=4, seed=12)
    tiny_causal_lm(bpe, paths["student_same"], arch="llama", hidden=32, layers=2, heads=4, seed=13)
    return paths
