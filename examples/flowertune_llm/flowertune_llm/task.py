"""flowertune-llm: the model (a causal LM with PEFT LoRA), the instruction data and local training.

Nothing here knows florana: it is the client side of any FlowerTune-style app. Offline by default: with no
`model.name` it builds a tiny Llama from a LlamaConfig (the same weights on every node: a fixed seed) with a byte
tokenizer, and generates small instruction data sets, one kind of task mix per partition (non-IID).
"""

from __future__ import annotations

import random

import torch
from peft import LoraConfig, get_peft_model

# the app's run config defaults, as pyproject.toml's [tool.flwr.app.config] declares them (`flwr run` passes those;
# flwr.simulation.run_simulation passes none)
DEFAULTS = {
    "num-server-rounds": 2,
    "strategy.method": "florana",
    "strategy.fraction-train": 1.0,
    "model.name": "",
    "model.lora.peft-lora-r": 4,
    "model.lora.peft-lora-alpha": 8,
    "train.learning-rate": 0.003,
    "train.local-steps": 3,
    "train.batch-size": 4,
    "train.seq-length": 64,
    "dataset.examples-per-partition": 32,
    "save-path": "",
}
PAD, BOS, EOS = 256, 257, 258  # the byte tokenizer's special tokens, after the 256 byte values
TEMPLATE = "### Instruction:\n{instruction}\n### Response:\n{response}"


def settings(run_config) -> dict:
    return {**DEFAULTS, **dict(run_config)}


def lora_config(cfg: dict) -> LoraConfig:
    return LoraConfig(r=int(cfg["model.lora.peft-lora-r"]), lora_alpha=int(cfg["model.lora.peft-lora-alpha"]),
                      target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")


def get_model(cfg: dict):
    """The base causal LM wrapped in a fresh PEFT LoRA adapter."""
    if cfg["model.name"]:
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(cfg["model.name"])
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)  # every node builds the same base weights and the same initial LoRA
        base = LlamaForCausalLM(LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                                            pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS))
    return get_peft_model(base, lora_config(cfg))


def encode(text: str, cfg: dict) -> list[int]:
    if cfg["model.name"]:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(cfg["model.name"])
        return tok(text + (tok.eos_token or ""))["input_ids"][: int(cfg["train.seq-length"])]
    return ([BOS] + list(text.encode()) + [EOS])[: int(cfg["train.seq-length"])]


def instruction(rng: random.Random, kind: str) -> dict:
    word = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(3, 6)))
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    return {"add": {"instruction": f"Add {a} and {b}.", "response": str(a + b)},
            "reverse": {"instruction": f"Reverse the word {word}.", "response": word[::-1]},
            "upper": {"instruction": f"Write {word} in capitals.", "response": word.upper()}}[kind]


def load_data(partition_id: int, num_partitions: int, cfg: dict) -> list[dict]:
    """Partition `partition_id`'s instruction examples: mostly one kind of task (which kind cycles with the
    partition), sizes that differ between partitions."""
    rng = random.Random(1000 + partition_id)
    kinds = ["add", "reverse", "upper"]
    main = kinds[partition_id % len(kinds)]
    n = int(cfg["dataset.examples-per-partition"]) * (1 + partition_id % 2)
    return [instruction(rng, main if rng.random() < 0.8 else rng.choice(kinds)) for _ in range(n)]


def train(model, data: list[dict], cfg: dict, seed: int) -> float:
    """A few AdamW steps of next-token loss on the LoRA parameters; the mean loss."""
    g = random.Random(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=float(cfg["train.learning-rate"]))
    model.train()
    losses = []
    for _ in range(int(cfg["train.local-steps"])):
        batch = [encode(TEMPLATE.format(**ex), cfg) for ex in g.sample(data, int(cfg["train.batch-size"]))]
        width = max(map(len, batch))
        ids = torch.tensor([x + [PAD] * (width - len(x)) for x in batch])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in batch])
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return sum(losses) / len(losses)
