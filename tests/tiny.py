"""Tiny models built from transformers configs (no download) and small text data sets for engine tests."""

import json
import random
from pathlib import Path

import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from florana.config import RunConfig
from florana.train.model import resolve_model

GOOD = "good great fine superb lovely wonderful brilliant moving".split()
BAD = "bad awful dull boring poor weak tedious clumsy".split()
FILL = "the film movie plot story acting cast script and was is a".split()


def tokenizer_dir(root: Path) -> Path:
    """MiniLM's BERT tokenizer, copied from the offline package."""
    out = root / "tokenizer"
    if not out.exists():
        AutoTokenizer.from_pretrained(resolve_model("minilm")[0]).save_pretrained(out)
    return out


def tiny_bert(root: Path) -> Path:
    out = root / "tiny-bert"
    if not out.exists():
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=48, max_position_embeddings=64, num_labels=2)
        BertForSequenceClassification(cfg).save_pretrained(out)
        AutoTokenizer.from_pretrained(tokenizer_dir(root)).save_pretrained(out)
    return out


def tiny_bert_bf16(root: Path) -> Path:
    """tiny_bert's weights stored in bfloat16, as most hub LLM checkpoints are (transformers loads them so)."""
    out = root / "tiny-bert-bf16"
    if not out.exists():
        BertForSequenceClassification.from_pretrained(tiny_bert(root)).to(torch.bfloat16).save_pretrained(out)
        AutoTokenizer.from_pretrained(tokenizer_dir(root)).save_pretrained(out)
    return out


def tiny_llama(root: Path) -> Path:
    out = root / "tiny-llama"
    if not out.exists():
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                          pad_token_id=0, eos_token_id=102, bos_token_id=101)
        LlamaForCausalLM(cfg).save_pretrained(out)
        AutoTokenizer.from_pretrained(tokenizer_dir(root)).save_pretrained(out)
    return out


def sentiment_csv(root: Path, n: int = 240, seed: int = 0) -> Path:
    """Short synthetic reviews whose label is carried by sentiment words: learnable in a few steps."""
    rng = random.Random(seed)
    path = root / "reviews.csv"
    lines = ["text,label"]
    for _ in range(n):
        label = rng.random() < 0.5
        words = rng.sample(FILL, 4) + rng.sample(GOOD if label else BAD, 2)
        rng.shuffle(words)
        lines.append(f"{' '.join(words)},{'pos' if label else 'neg'}")
    path.write_text("\n".join(lines) + "\n")
    return path


def arithmetic_jsonl(root: Path, n: int = 60, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path = root / "sums.jsonl"
    with path.open("w") as f:
        for _ in range(n):
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            f.write(json.dumps({"question": f"What is {a} plus {b}?", "answer": str(a + b)}) + "\n")
    return path


def tiny_config(assets, **kw) -> RunConfig:
    """A run on the tiny BERT and the sentiment CSV of `assets` ({"bert": …, "csv": …}): 3 clients, 2 rounds of 2
    steps, seconds on a CPU; `kw` overrides any key."""
    base = dict(model=str(assets["bert"]), dataset=str(assets["csv"]), num_clients=3, rounds=2, local_steps=2,
                batch_size=8, test_size=40, client_test_max=10, max_length=16, lora_r=2, lora_alpha=4.0,
                threads=1, bf16=False, lr=5e-3, alpha=1.0)
    base.update(kw)
    return RunConfig(**base)
