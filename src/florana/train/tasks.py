"""What differs between tasks: how examples become batches, and how a model is scored.

classification: cross-entropy on the label; accuracy, macro-F1 and loss.
causal_lm: instruction SFT with the loss on the answer tokens only; exact match of the final number in a
greedy completion, and the answer loss.
Batches are padded to their longest member (dynamic padding), which is what makes short texts fast. A task's
batches are put on its precision's device (where the model is), and the model runs under its autocast.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from florana.data.sources import Examples
from florana.train.device import Precision

IGNORE = -100
NUMBER = re.compile(r"-?\d[\d,]*\.?\d*")


@dataclass(frozen=True)
class Encoded:
    """Tokenised examples: input ids, per-token labels (causal) or class labels, and the raw answers."""

    ids: list[list[int]]
    targets: list
    answers: list[str] | None = None
    prompts: list[list[int]] | None = None

    def __len__(self) -> int:
        return len(self.ids)


PAD_MULTIPLE = 8


def _pad(seqs: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    """Pad to the longest sequence rounded up to a multiple of 8: nearly all of dynamic padding's speed,
    and few distinct shapes, so the CPU kernels' per-shape caches stop growing with the number of clients."""
    width = -(-max(len(s) for s in seqs) // PAD_MULTIPLE) * PAD_MULTIPLE
    rows = [([value] * (width - len(s)) + s) if left else (s + [value] * (width - len(s))) for s in seqs]
    return torch.tensor(rows, dtype=torch.long)


def macro_f1(pred: np.ndarray, gold: np.ndarray, num_classes: int) -> float:
    scores = []
    for c in range(num_classes):
        tp = int(((pred == c) & (gold == c)).sum())
        fp = int(((pred == c) & (gold != c)).sum())
        fn = int(((pred != c) & (gold == c)).sum())
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


def on_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


class ClassificationTask:
    def __init__(self, tokenizer, max_length: int, num_classes: int, precision: Precision):
        self.tokenizer, self.max_length, self.num_classes, self.precision = tokenizer, max_length, num_classes, precision

    def encode(self, examples: Examples) -> Encoded:
        ids = self.tokenizer(examples.texts, truncation=True, max_length=self.max_length)["input_ids"] if len(
            examples) else []
        return Encoded(ids=list(ids), targets=[int(x) for x in examples.labels])

    def batch(self, data: Encoded, idx) -> dict:
        seqs = [data.ids[i] for i in idx]
        input_ids = _pad(seqs, self.tokenizer.pad_token_id)
        return on_device({"input_ids": input_ids, "attention_mask": _pad([[1] * len(s) for s in seqs], 0),
                          "labels": torch.tensor([data.targets[i] for i in idx], dtype=torch.long)},
                         self.precision.device)

    @torch.no_grad()
    def evaluate(self, model, data: Encoded, batch_size: int) -> dict:
        model.eval()
        preds, losses = [], []
        for start in range(0, len(data), batch_size):
            idx = range(start, min(start + batch_size, len(data)))
            batch = self.batch(data, idx)
            with self.precision.autocast():
                out = model(**batch)
            preds.append(out.logits.float().argmax(-1).cpu().numpy())
            losses.append(out.loss.float().item() * len(idx))
        if not preds:
            return {"accuracy": None, "macro_f1": None, "loss": None}
        pred, gold = np.concatenate(preds), np.array(data.targets)
        return {"accuracy": float((pred == gold).mean()), "macro_f1": macro_f1(pred, gold, self.num_classes),
                "loss": float(sum(losses) / len(data))}


def final_number(text: str) -> str | None:
    found = NUMBER.findall(text)
    if not found:
        return None
    value = found[-1].replace(",", "").rstrip(".")
    try:
        number = float(value)
    except ValueError:
        return None
    return str(int(number)) if number == int(number) else str(number)


class CausalLMTask:
    """Prompt = the tokenizer's chat template (or 'Question: …\\nAnswer:'), target = 'The answer is N.' + EOS."""

    def __init__(self, tokenizer, max_length: int, precision: Precision, max_new_tokens: int):
        self.tokenizer, self.max_length, self.precision = tokenizer, max_length, precision
        self.max_new_tokens = max_new_tokens

    def prompt(self, question: str) -> list[int]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                          tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        else:
            ids = tok(f"Question: {question}\nAnswer:", add_special_tokens=False)["input_ids"]
        return list(ids)

    def encode(self, examples: Examples) -> Encoded:
        tok = self.tokenizer
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        ids, targets, prompts = [], [], []
        for question, answer in zip(examples.texts, examples.answers):
            p = self.prompt(question)
            a = tok(f" The answer is {answer}.", add_special_tokens=False)["input_ids"] + eos
            p = p[-max(1, self.max_length - len(a)):]
            ids.append(p + a)
            targets.append([IGNORE] * len(p) + a)
            prompts.append(p)
        return Encoded(ids=ids, targets=targets, answers=list(examples.answers), prompts=prompts)

    def batch(self, data: Encoded, idx) -> dict:
        seqs = [data.ids[i] for i in idx]
        return on_device({"input_ids": _pad(seqs, self.tokenizer.pad_token_id),
                          "attention_mask": _pad([[1] * len(s) for s in seqs], 0),
                          "labels": _pad([data.targets[i] for i in idx], IGNORE)}, self.precision.device)

    @torch.no_grad()
    def evaluate(self, model, data: Encoded, batch_size: int) -> dict:
        model.eval()
        correct, loss_sum, tokens = 0, 0.0, 0
        for start in range(0, len(data), batch_size):
            idx = list(range(start, min(start + batch_size, len(data))))
            batch = self.batch(data, idx)
            with self.precision.autocast():
                out = model(**batch)
            n = int((batch["labels"][:, 1:] != IGNORE).sum())
            loss_sum, tokens = loss_sum + out.loss.float().item() * n, tokens + n
            prompts = [data.prompts[i] for i in idx]
            device = self.precision.device
            input_ids = _pad(prompts, self.tokenizer.pad_token_id, left=True).to(device)
            mask = _pad([[1] * len(p) for p in prompts], 0, left=True).to(device)
            with self.precision.autocast():
                gen = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=self.max_new_tokens,
                                     do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
            for i, row in zip(idx, gen[:, input_ids.shape[1]:].tolist()):
                text = self.tokenizer.decode(row, skip_special_tokens=True)
                correct += final_number(text) == final_number(data.answers[i])
        if not len(data):
            return {"accuracy": None, "macro_f1": None, "loss": None}
        return {"accuracy": correct / len(data), "macro_f1": None, "loss": loss_sum / max(tokens, 1)}
