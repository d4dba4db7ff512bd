"""What differs between tasks: how examples become batches, and how a model is scored.

classification: cross-entropy on the label; accuracy, macro-F1 and loss.
causal_lm: instruction SFT with the loss on the answer tokens only; exact match of the answer in a greedy
completion (a number: its final number; else the answer it states), and the answer loss.
code: instruction → a Python function; the target is the reference solution, the score pass@1 of the greedy
completion run with the example's own tests in the sandbox (train/sandbox.py), never in this process.
Batches are padded to their longest member (dynamic padding), which is what makes short texts fast; generation
is batched greedy decoding, prompts left-padded, with the KV cache. A task's batches are put on its precision's
device (where the model is), and the model runs under its autocast.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass, fields

import numpy as np
import torch

from florana.data.sources import Examples
from florana.train.device import Precision
from florana.train.sandbox import Limits, run_programs

IGNORE = -100
NUMBER = re.compile(r"-?\d[\d,]*\.?\d*")


@dataclass(frozen=True)
class Encoded:
    """Tokenised examples: input ids, per-token labels (causal) or class labels, the raw answers, the prompts'
    ids (generation); for code, each example's tests and the Python its completion continues (HumanEval's prompt)."""

    ids: list[list[int]]
    targets: list
    answers: list[str] | None = None
    prompts: list[list[int]] | None = None
    tests: list[str] | None = None
    prefixes: list[str] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, idx) -> Encoded:
        return Encoded(**{f.name: None if getattr(self, f.name) is None else [getattr(self, f.name)[i] for i in idx]
                          for f in fields(self)})

    @staticmethod
    def concat(parts: list[Encoded]) -> Encoded:
        return Encoded(**{f.name: None if getattr(parts[0], f.name) is None else
                          [x for p in parts for x in getattr(p, f.name)] for f in fields(Encoded)})


PAD_MULTIPLE = 8


def _pad(seqs: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    """Pad to the longest sequence rounded up to a multiple of 8: nearly all of dynamic padding's speed,
    and few distinct shapes, so the CPU kernels' per-shape caches stop growing with the number of clients."""
    width = -(-max(len(s) for s in seqs) // PAD_MULTIPLE) * PAD_MULTIPLE
    rows = [([value] * (width - len(s)) + s) if left else (s + [value] * (width - len(s))) for s in seqs]
    return torch.tensor(rows, dtype=torch.long)


def by_length(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Evaluation batches of indices in order of length (ties in index order): each batch pads to nearly its own
    length, not to the longest example in a random draw. Scores do not depend on order, only the padding does."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def macro_f1(pred: np.ndarray, gold: np.ndarray, num_classes: int) -> float:
    scores = []
    for c in range(num_classes):
        tp = int(((pred == c) & (gold == c)).sum())
        fp = int(((pred == c) & (gold != c)).sum())
        fn = int(((pred != c) & (gold == c)).sum())
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


def logit_spread(logits: torch.Tensor) -> float | None:
    """How much a classifier's answers vary across examples: the std over examples of each class's logit, centred
    per example (what softmax sees), averaged over classes. Near 0 when every input gets nearly the same logits (an
    untrained head, or a representation that no longer tells inputs apart); accuracy alone cannot tell that from a
    biased head on varied features, whose spread is large."""
    if len(logits) < 2:
        return None
    return float((logits - logits.mean(-1, keepdim=True)).std(0).mean())


def majority_accuracy(train: list, test: list, same=lambda answer, gold: answer == gold) -> float | None:
    """The share of `test` that always giving `train`'s most frequent answer gets right (ties: the smallest
    answer): the local accuracy a client reaches by keeping its own label skew and learning nothing else. None
    where either side has no examples."""
    if not train or not test:
        return None
    counts = Counter(train)
    top = max(counts.values())
    answer = min(a for a, c in counts.items() if c == top)
    return sum(bool(same(answer, gold)) for gold in test) / len(test)


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
        if not len(data):
            return {"accuracy": None, "macro_f1": None, "loss": None, "logit_spread": None}
        pred, losses, logits = np.empty(len(data), dtype=np.int64), [], []
        for idx in by_length([len(s) for s in data.ids], batch_size):
            batch = self.batch(data, idx)
            with self.precision.autocast():
                out = model(**batch)
            logits.append(out.logits.float().cpu())
            pred[idx] = logits[-1].argmax(-1).numpy()
            losses.append(out.loss.float().item() * len(idx))
        gold = np.array(data.targets)
        return {"accuracy": float((pred == gold).mean()), "macro_f1": macro_f1(pred, gold, self.num_classes),
                "loss": float(sum(losses) / len(data)), "logit_spread": logit_spread(torch.cat(logits))}

    def majority_accuracy(self, train: Encoded, test: Encoded) -> float | None:
        """The accuracy on `test` of answering `train`'s majority class (majority_accuracy)."""
        return majority_accuracy(train.targets, test.targets)


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


STATED = re.compile(r"the answer is:?", re.IGNORECASE)


def stated_answer(text: str) -> str:
    """What a completion states as its answer: the first line after its last 'The answer is' (else its first
    line), spaces and a closing period trimmed."""
    parts = STATED.split(text)
    return parts[-1].strip().split("\n", 1)[0].strip().removesuffix(".").strip()


def same_answer(completion: str, gold: str) -> bool:
    """Exact match. A numeric gold answer (GSM8K's, arithmetic) is compared with the completion's final number, as
    numbers ('1,234' = '1234.0'); any other (a word, a list, a fraction) with its stated answer, character for
    character: reasoning-gym's full-credit rule (its default scorer gives 1.0 only to answer == oracle)."""
    if NUMBER.fullmatch(gold.strip()):
        return final_number(completion) == final_number(gold)
    return stated_answer(completion) == gold.strip().removesuffix(".").strip()


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

    def target(self, answer: str) -> str:
        return f" The answer is {answer}."

    def fit(self, prompt: list[int], answer: list[int]) -> tuple[list[int], list[int]]:
        """The prompt and answer ids of one training sequence: the prompt loses its start to keep the answer."""
        return prompt[-max(1, self.max_length - len(answer)):], answer

    def encode(self, examples: Examples) -> Encoded:
        tok = self.tokenizer
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        ids, targets, prompts = [], [], []
        for question, answer in zip(examples.texts, examples.answers):
            p, a = self.fit(self.prompt(question), tok(self.target(answer), add_special_tokens=False)["input_ids"] + eos)
            ids.append(p + a)
            targets.append([IGNORE] * len(p) + a)
            prompts.append(p)
        return Encoded(ids=ids, targets=targets, answers=list(examples.answers), prompts=prompts)

    def batch(self, data: Encoded, idx) -> dict:
        seqs = [data.ids[i] for i in idx]
        return on_device({"input_ids": _pad(seqs, self.tokenizer.pad_token_id),
                          "attention_mask": _pad([[1] * len(s) for s in seqs], 0),
                          "labels": _pad([data.targets[i] for i in idx], IGNORE)}, self.precision.device)

    def eos_ids(self, model) -> set[int]:
        """Every token id that ends a generation (the generation config may list several, e.g. chat models)."""
        ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        ids = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
        return ids | ({self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set())

    @torch.no_grad()
    def generate(self, model, prompts: list[list[int]]) -> tuple[list[str], int]:
        """Greedy completions of a batch of prompts, left-padded so that each continues its own last token, with
        the KV cache; and the tokens generated (up to each one's end of sequence)."""
        input_ids = _pad(prompts, self.tokenizer.pad_token_id, left=True).to(self.precision.device)
        mask = _pad([[1] * len(p) for p in prompts], 0, left=True).to(self.precision.device)
        with self.precision.autocast():
            gen = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=self.max_new_tokens,
                                 do_sample=False, use_cache=True, pad_token_id=self.tokenizer.pad_token_id)
        eos, texts, tokens = self.eos_ids(model), [], 0
        for row in gen[:, input_ids.shape[1]:].tolist():
            end = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
            tokens += end
            texts.append(self.tokenizer.decode(row[:end], skip_special_tokens=True))
        return texts, tokens

    def correct(self, completions: list[str], data: Encoded, idx: list[int]) -> list[bool]:
        """Exact match of the answer (same_answer)."""
        return [same_answer(text, data.answers[i]) for text, i in zip(completions, idx)]

    def majority_accuracy(self, train: Encoded, test: Encoded) -> float | None:
        """The exact match on `test` of answering `train`'s most frequent answer (majority_accuracy)."""
        return majority_accuracy(train.answers or [], test.answers or [], same_answer)

    @torch.no_grad()
    def evaluate(self, model, data: Encoded, batch_size: int) -> dict:
        """Accuracy of greedy completions and the answer loss; with the tokens generated and the seconds it took."""
        model.eval()
        loss_sum, tokens, completions, generated, seconds = 0.0, 0, [""] * len(data), 0, 0.0
        for idx in by_length([len(p) for p in data.prompts], batch_size):
            batch = self.batch(data, idx)
            with self.precision.autocast():
                out = model(**batch)
            n = int((batch["labels"][:, 1:] != IGNORE).sum())
            loss_sum, tokens = loss_sum + out.loss.float().item() * n, tokens + n
            t0 = time.perf_counter()
            texts, count = self.generate(model, [data.prompts[i] for i in idx])
            seconds += time.perf_counter() - t0
            for i, text in zip(idx, texts):
                completions[i] = text
            generated += count
        if not len(data):
            return {"accuracy": None, "macro_f1": None, "loss": None}
        correct = self.correct(completions, data, list(range(len(data))))
        return {"accuracy": sum(correct) / len(data), "macro_f1": None, "loss": loss_sum / max(tokens, 1),
                "generated_tokens": generated, "generate_seconds": seconds}


FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(text: str) -> str:
    """The Python in a completion: the first fenced block that defines something (else the first fenced block;
    an unclosed fence runs to the end), or the raw text; indentation kept, since a body continues a prompt."""
    blocks = [body for lang, body in FENCE.findall(text) if lang.lower() in ("", "python", "py", "python3")]
    if blocks:
        return next((b for b in blocks if "def " in b), blocks[0])
    return text


def is_python(text: str) -> bool:
    try:
        compile(text, "<prompt>", "exec")
    except (SyntaxError, ValueError):
        return False
    return True


class CodeTask(CausalLMTask):
    """Prompt = the instruction (chat template), target = the reference code + EOS; scored by pass@1: the greedy
    completion's code, run with the example's own tests in a sandboxed process each, `workers` at a time. When the
    prompt is itself Python (HumanEval's signature and docstring) the program is prompt + completion + tests: a
    completion of only the body continues the prompt's function, a whole function redefines it below the
    prompt's imports."""

    def __init__(self, tokenizer, max_length: int, precision: Precision, max_new_tokens: int,
                 limits: Limits = Limits(), workers: int = 2):
        super().__init__(tokenizer, max_length, precision, max_new_tokens)
        self.limits, self.workers = limits, workers

    def target(self, answer: str) -> str:
        return answer

    def fit(self, prompt: list[int], answer: list[int]) -> tuple[list[int], list[int]]:
        """The prompt kept (its last max_length − 1 tokens), the code cut to the room left: code is long."""
        prompt = prompt[-(self.max_length - 1):] if self.max_length > 1 else prompt[-1:]
        return prompt, answer[: max(0, self.max_length - len(prompt))]

    def encode(self, examples: Examples) -> Encoded:
        enc = super().encode(examples)
        prefixes = [t + "\n" if "def " in t and is_python(t) else "" for t in examples.texts]
        return Encoded(enc.ids, enc.targets, enc.answers, enc.prompts, list(examples.tests), prefixes)

    def majority_accuracy(self, train: Encoded, test: Encoded) -> None:
        """None: one reference program is no answer to another problem."""

    def program(self, completion: str, data: Encoded, i: int) -> str:
        return f"{data.prefixes[i]}{extract_code(completion)}\n\n{data.tests[i]}"

    def correct(self, completions: list[str], data: Encoded, idx: list[int]) -> list[bool]:
        programs = [self.program(text, data, i) for text, i in zip(completions, idx)]
        return [o.passed for o in run_programs(programs, self.limits, self.workers)]
