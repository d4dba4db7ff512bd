"""Causal-LM evaluation that scales (batched greedy generation, eval_max_examples, tokens/s), GSM8K answers, and the
code task (HumanEval/MBPP data, code extraction, pass@1 in the sandbox, a run end to end) on tiny models."""

import json
import random

import numpy as np
import pytest
import torch

from florana.config import RunConfig
from florana.data import load_examples
from florana.errors import FloranaError
from florana.federation import engine
from florana.federation.engine import run
from florana.train.device import precision_for
from florana.train.model import load_model
from florana.train.sandbox import Limits
from florana.train.tasks import CausalLMTask, ClassificationTask, CodeTask, Encoded, extract_code, logit_spread
from tiny import arithmetic_jsonl, tiny_bert, tiny_llama

FP32 = precision_for(torch.device("cpu"), False)  # exact comparisons: no autocast

FAST = Limits(timeout_s=2.0, memory_mib=256)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return {"llama": tiny_llama(root), "jsonl": arithmetic_jsonl(root), "mbpp": mbpp_jsonl(root), "root": root}


def mbpp_jsonl(root, n: int = 24, seed: int = 0):
    """Tiny problems in MBPP's columns: add/multiply/subtract k, three asserts each."""
    rng = random.Random(seed)
    path = root / "mbpp.jsonl"
    with path.open("w") as f:
        for i in range(n):
            op, k = rng.choice([("+", "add"), ("*", "times"), ("-", "minus")]), rng.randint(1, 9)
            name = f"{op[1]}_{k}"
            tests = [f"assert {name}({x}) == {eval(f'{x} {op[0]} {k}')}" for x in (1, 2, 5)]
            f.write(json.dumps({"task_id": i, "text": f"Write a function {name} that returns x {op[0]} {k}.",
                                "code": f"def {name}(x):\r\n    return x {op[0]} {k}", "test_list": tests,
                                "test_setup_code": ""}) + "\n")
    return path


def tiny_peft(assets, seed=0):
    """The tiny Llama under LoRA with a random B, so that the adapter changes what is generated."""
    lora = {"r": 2, "lora_alpha": 4.0, "lora_dropout": 0.0, "use_rslora": False, "target_modules": ["q_proj", "v_proj"]}
    model, tok = load_model("causal_lm", str(assets["llama"]), 1, lora, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval(), tok


# ---- batched greedy generation ---------------------------------------------------------------------------------
def test_batched_generation_equals_one_by_one_greedy_generation(assets):
    """Prompts of different lengths, left-padded into one batch, give exactly the tokens each gives alone, unpadded
    (float32: bf16 rounding would differ with the padding)."""
    model, tok = tiny_peft(assets)
    task = CausalLMTask(tok, max_length=64, precision=FP32, max_new_tokens=12)
    questions = ["What is 3 plus 4?", "Add two and two please, then tell me the sum of it all.", "7 + 1?",
                 "How many legs do three cats have in total if each has four?", "Sum 9 and 9."]
    prompts = [task.prompt(q) for q in questions]
    assert len({len(p) for p in prompts}) == len(prompts)
    batched, tokens = task.generate(model, prompts)
    alone = []
    for p in prompts:
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        alone.append(tok.decode(out[0, len(p):], skip_special_tokens=True))
    assert batched == alone
    assert len(set(batched)) > 1 and all(batched)  # the adapter makes the tiny model say different things
    assert 0 < tokens <= 12 * len(prompts)


def test_generation_uses_the_kv_cache_and_counts_tokens_to_the_end_of_sequence(assets, monkeypatch):
    model, tok = tiny_peft(assets)
    task = CausalLMTask(tok, max_length=64, precision=FP32, max_new_tokens=6)
    seen = {}
    assert task.eos_ids(model) == {102}  # the model's generation config (this tokenizer has no EOS of its own)
    eos = 102

    def fake_generate(input_ids, attention_mask, **kwargs):
        seen.update(kwargs, left_padded=bool((attention_mask[:, 0] == 0).any()))
        new = torch.tensor([[5, 6, eos, 0, 0, 0], [7, 8, 9, 10, 11, 12]])
        return torch.cat([input_ids, new], dim=1)
    monkeypatch.setattr(model, "generate", fake_generate)
    texts, tokens = task.generate(model, [task.prompt("a b c d e f g h i j"), task.prompt("k")])
    assert seen["use_cache"] is True and seen["do_sample"] is False and seen["left_padded"]
    assert tokens == 3 + 6 and len(texts) == 2


def test_causal_evaluate_reports_generated_tokens_and_seconds(assets):
    model, tok = tiny_peft(assets)
    task = CausalLMTask(tok, max_length=32, precision=FP32, max_new_tokens=4)
    data = task.encode(load_examples(str(assets["jsonl"]), text_column="question", label_column="answer",
                                     causal=True, max_examples=6))
    scores = task.evaluate(model, data, batch_size=4)
    assert 0 <= scores["accuracy"] <= 1 and scores["loss"] > 0
    assert 0 < scores["generated_tokens"] <= 4 * 6 and scores["generate_seconds"] > 0


# ---- evaluation batches by length ------------------------------------------------------------------------------
class Widths(torch.nn.Module):
    """A model wrapper that records the padded width of every batch it is given."""

    def __init__(self, model):
        super().__init__()
        self.model, self.widths = model, []

    def forward(self, **batch):
        self.widths.append(batch["input_ids"].shape[1])
        return self.model(**batch)

    def generate(self, **kw):
        self.widths.append(kw["input_ids"].shape[1])
        return self.model.generate(**kw)


def interleaved(lengths_short_long: tuple[int, int], n: int, vocab: int = 2000, seed: int = 0) -> list[list[int]]:
    """n token sequences alternating short and long, the worst order for padding in file order."""
    g = random.Random(seed)
    return [[g.randrange(1000, vocab) for _ in range(lengths_short_long[i % 2] + g.randrange(3))] for i in range(n)]


def test_classification_scores_batches_of_similar_length_and_keeps_each_prediction_with_its_example(assets):
    """Batches are formed in order of length, so a short example is not padded to a long one's width; predictions
    go back to their examples: the same accuracy, macro-F1 and loss as scoring each example alone."""
    from florana.train.model import load_model
    lora = {"r": 2, "lora_alpha": 4.0, "lora_dropout": 0.0, "use_rslora": False, "target_modules": ["query", "value"]}
    model, tok = load_model("classification", str(tiny_bert(assets["root"])), 2, lora, 0)
    task = ClassificationTask(tok, max_length=64, num_classes=2, precision=FP32)
    ids = interleaved((4, 40), 16)
    data = Encoded(ids=ids, targets=[i % 3 % 2 for i in range(16)])
    wrapped = Widths(model.eval())
    scores = task.evaluate(wrapped, data, batch_size=8)
    assert sorted(wrapped.widths) == [8, 48]  # file order would pad both batches to 48
    alone = [task.evaluate(model, data.subset([i]), batch_size=1) for i in range(16)]
    assert scores["accuracy"] == pytest.approx(np.mean([a["accuracy"] for a in alone]))
    assert scores["loss"] == pytest.approx(np.mean([a["loss"] for a in alone]), rel=1e-5)
    assert 0 < scores["accuracy"] < 1  # a mix of right and wrong answers, so order mistakes would show


def test_logit_spread_tells_one_answer_for_every_input_from_varied_answers(assets):
    """The spread is the std over examples of the per-example-centred logits, as scoring each example alone gives
    them; a head that ignores its input (every example the same logits, as in a collapsed representation) has
    spread 0 at the majority accuracy."""
    from florana.train.model import load_model
    lora = {"r": 2, "lora_alpha": 4.0, "lora_dropout": 0.0, "use_rslora": False, "target_modules": ["query", "value"]}
    model, tok = load_model("classification", str(tiny_bert(assets["root"])), 2, lora, 0)
    task = ClassificationTask(tok, max_length=64, num_classes=2, precision=FP32)
    data = Encoded(ids=interleaved((4, 40), 16), targets=[i % 3 % 2 for i in range(16)])
    model.eval()
    with torch.no_grad():
        alone = torch.cat([model(**task.batch(data, [i])).logits for i in range(16)])
    expected = (alone - alone.mean(-1, keepdim=True)).std(0).mean().item()
    assert task.evaluate(model, data, batch_size=8)["logit_spread"] == pytest.approx(expected, rel=1e-4)
    assert expected > 1e-3
    assert logit_spread(torch.tensor([[0.0, 2.0], [0.0, -2.0]])) == pytest.approx(2 ** 0.5)
    assert logit_spread(torch.zeros(1, 2)) is None  # one example has no spread
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 2]
    with torch.no_grad():
        for linear in head:
            linear.weight.zero_()
    collapsed = task.evaluate(model, data, batch_size=8)
    assert collapsed["logit_spread"] == pytest.approx(0.0, abs=1e-6)
    assert collapsed["accuracy"] in (np.mean(data.targets), 1 - np.mean(data.targets))


def test_causal_evaluate_generates_for_prompts_of_similar_length_and_keeps_each_completion_with_its_example(assets):
    model, tok = tiny_peft(assets)
    task = CausalLMTask(tok, max_length=64, precision=FP32, max_new_tokens=4)
    prompts = interleaved((3, 30), 8)
    answers = []
    for p in prompts:  # each example's gold answer is what the model says to it alone, so all 8 must match
        text, _ = task.generate(model, [p])
        answers.append(text[0].strip() or "-")
    data = Encoded(ids=prompts, targets=[[-100] * (len(p) - 1) + [p[-1]] for p in prompts], answers=answers,
                   prompts=prompts)
    task.correct = lambda completions, data, idx: [c.strip() == data.answers[i] for c, i in zip(completions, idx)]
    wrapped = Widths(model)
    scores = task.evaluate(wrapped, data, batch_size=4)
    assert scores["accuracy"] == 1.0
    assert sorted(set(wrapped.widths)) == [8, 32]  # short prompts with short ones, long with long


# ---- eval_max_examples and the final evaluation ----------------------------------------------------------------
def causal_config(assets, **kw):
    base = dict(task="causal_lm", model=str(assets["llama"]), dataset=str(assets["jsonl"]), text_column="question",
                label_column="answer", target_modules=["q_proj", "v_proj"], num_clients=2, rounds=2, local_steps=1,
                batch_size=4, eval_batch_size=8, test_size=10, client_test_max=2, max_length=32, max_new_tokens=3,
                partition="iid", lora_r=2, lora_alpha=4.0, threads=1, bf16=False, method="fedit")
    base.update(kw)
    return RunConfig(**base)


def test_eval_max_examples_scores_a_fixed_subset_each_round_and_everything_at_the_end(assets, tmp_path, monkeypatch):
    scored = []
    real = engine.Federation.evaluate

    def spy(self, tensors, data):
        if len(data) > 2:  # not a client's held-out part
            scored.append(list(data.answers))
        return real(self, tensors, data)
    monkeypatch.setattr(engine.Federation, "evaluate", spy)
    history = run(causal_config(assets, eval_max_examples=4), tmp_path / "sub").history
    assert [len(s) for s in scored] == [4, 4, 10] and scored[0] == scored[1]
    assert "final_global_accuracy" not in history[0]
    last = history[-1]
    assert 0 <= last["final_global_accuracy"] <= 1 and last["final_global_loss"] > 0
    assert last["eval_tokens_per_s"] > 0 and last["final_eval_tokens_per_s"] > 0
    assert 0 < last["eval_generated_tokens"] <= 4 * 3 and last["final_eval_generated_tokens"] <= 10 * 3
    log = (tmp_path / "sub" / "run.log").read_text()
    assert "global test on 4 examples" in log and "final global test on 10 examples" in log
    assert "tokens/s" in log and "on the whole test set (10 examples)" in log

    scored.clear()  # 0 (the default): every round scores the whole test set, once
    history = run(causal_config(assets), tmp_path / "all").history
    assert [len(s) for s in scored] == [10, 10]
    assert "final_global_accuracy" not in history[-1] and history[-1]["eval_tokens_per_s"] > 0

    from florana.report.tables import run_numbers

    assert run_numbers([last])["global_accuracy"] == last["final_global_accuracy"]


# ---- reasoning-gym tasks and the untuned score ------------------------------------------------------------------
ARITHMETIC = "reasoning_gym:basic_arithmetic:min_terms=2;max_terms=3;max_digits=1"


def test_a_reasoning_gym_task_runs_end_to_end_partitioned_by_its_groups(assets, tmp_path):
    cfg = causal_config(assets, dataset=ARITHMETIC, max_examples=80, partition="shards", shards_per_client=1,
                        rounds=1)
    history = run(cfg, tmp_path / "run").history
    assert 0 <= history[0]["global_accuracy"] <= 1 and history[0]["global_loss"] > 0
    stats = json.loads((tmp_path / "run" / "partition.json").read_text())
    assert [sum(1 for n in s["labels"].values() if n) for s in stats] == [1, 1]  # one group (2 or 3 terms) each


def untuned():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "untuned_score.py"
    spec = importlib.util.spec_from_file_location("untuned_score", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_untuned_score_is_the_base_model_on_the_runs_own_test_subset(assets):
    cfg = causal_config(assets, dataset=ARITHMETIC, max_examples=80, eval_max_examples=6)
    score = untuned().untuned_score(cfg)
    fed = engine.Federation(cfg)
    assert len(fed.eval_test) == score["examples"] == 6
    with fed.model.disable_adapter():
        base = fed.task.evaluate(fed.model, fed.eval_test, cfg.eval_batch_size)
    assert score["accuracy"] == base["accuracy"] and score["loss"] == pytest.approx(base["loss"], rel=1e-6)
    fed.slots.write({k: t + 0.5 if ".lora_B." in k else t for k, t in fed.initial.items()})
    assert fed.task.evaluate(fed.model, fed.eval_test, cfg.eval_batch_size)["loss"] != pytest.approx(base["loss"])


# ---- GSM8K -------------------------------------------------------------------------------------------------------
def test_gsm8k_answers_are_the_number_after_the_four_hashes(tmp_path):
    rows = [{"question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
             "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\nIn all 48+24 = <<48+24=72>>72.\n#### 72"},
            {"question": "A big one?", "answer": "It costs 1,000 + 234 = 1,234 dollars.\n#### 1,234"},
            {"question": "Negative?", "answer": "5 - 8 = -3\n#### -3"}]
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ex = load_examples(str(path), text_column="question", label_column="answer", causal=True)
    assert ex.answers == ["72", "1234", "-3"] and ex.texts[1] == "A big one?"
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"question": "q", "answer": "Paris, France"}) + "\n")
    assert load_examples(str(plain), text_column="question", label_column="answer", causal=True).answers == \
        ["Paris, France"]


# ---- code data -------------------------------------------------------------------------------------------------
def test_humaneval_ships_offline_with_its_tests():
    ex = load_examples("humaneval", code=True)
    assert len(ex) == 164 and len(ex.tests) == 164 and ex.labels.tolist() == [0] * 164
    assert ex.texts[0].lstrip().startswith("from typing import List") and "def has_close_elements" in ex.texts[0]
    assert ex.answers[0].startswith("    for idx") and ex.tests[0].rstrip().endswith("check(has_close_elements)")
    with pytest.raises(FloranaError, match="is a code dataset; set task = 'code'"):
        load_examples("humaneval", causal=True)
    with pytest.raises(FloranaError, match="is a code dataset"):
        load_examples("humaneval")


def test_mbpp_format_files_and_errors(assets, tmp_path):
    ex = load_examples(str(assets["mbpp"]), code=True)
    assert len(ex) == 24 and "\r" not in ex.answers[0]
    assert ex.texts[0].endswith(ex.tests[0].strip().splitlines()[0])  # the prompt shows the first test
    assert ex.tests[0].count("assert ") == 3
    assert ex.subset([2, 0]).tests == [ex.tests[2], ex.tests[0]]
    with pytest.raises(FloranaError, match="MBPP's columns"):
        load_examples(str(assets["jsonl"]), code=True)


@pytest.mark.parametrize("text, code", [
    ("Here you go:\n```python\ndef f(x):\n    return x\n```\nDone.", "def f(x):\n    return x\n"),
    ("```\nimport math\n```\n```py\ndef g():\n    return 1\n```", "def g():\n    return 1\n"),
    ("```python\ndef cut(x):\n    return x", "def cut(x):\n    return x"),  # unclosed: cut by max_new_tokens
    ("    return number % 1.0\n", "    return number % 1.0\n"),  # a raw body keeps its indentation
    ("```js\nlet x\n```\ndef h(): pass", "```js\nlet x\n```\ndef h(): pass"),
])
def test_extract_code(text, code):
    assert extract_code(text) == code


def code_task(tok, **kw):
    return CodeTask(tok, max_length=kw.get("max_length", 256), precision=FP32, max_new_tokens=8, limits=FAST, workers=2)


def test_pass_at_1_of_bodies_whole_functions_and_wrong_answers_on_humaneval(assets):
    """Scored in the sandbox: HumanEval's canonical body continues the prompt; a whole function in a fence (without
    the prompt's imports) passes too; a wrong body, an exit before the tests, and chatter fail."""
    _, tok = tiny_peft(assets)
    ex = load_examples("humaneval", code=True).subset(np.arange(0, 164, 20))
    task = code_task(tok)
    data = task.encode(ex)
    idx = list(range(len(ex)))
    assert task.correct(list(ex.answers), data, idx) == [True] * len(idx)
    whole = [f"Sure:\n```python\ndef {ex.texts[i].split('def ', 1)[1]}{ex.answers[i]}```" for i in idx]
    assert task.correct(whole, data, idx) == [True] * len(idx)
    wrong = ["    return None\n", "    import sys\n    sys.exit(0)\n", "I cannot help with that."] * 3
    assert task.correct(wrong[:len(idx)], data, idx) == [False] * len(idx)


def test_mbpp_targets_are_the_code_and_programs_are_code_plus_tests(assets):
    _, tok = tiny_peft(assets)
    ex = load_examples(str(assets["mbpp"]), code=True, max_examples=4)
    task = code_task(tok)
    data = task.encode(ex)
    assert data.prefixes == [""] * 4  # a natural-language prompt is not part of the program
    assert task.correct(list(ex.answers), data, [0, 1, 2, 3]) == [True] * 4
    assert task.correct(["```python\n" + ex.answers[1] + "\n```"] * 4, data, [0, 1, 2, 3]).count(True) >= 1
    target = [t for t in data.targets[0] if t != -100]
    assert tok.decode(target, skip_special_tokens=True).replace(" ", "") == \
        ex.answers[0].lower().replace(" ", "").replace("\n", "")  # the BERT vocabulary lowercases
    short = code_task(tok, max_length=24).encode(ex)
    assert all(len(ids) <= 24 for ids in short.ids) and all(len(p) == 23 for p in short.prompts)


def test_code_task_runs_end_to_end(assets, tmp_path, monkeypatch):
    cfg = causal_config(assets, task="code", dataset=str(assets["mbpp"]), rounds=1, test_size=6, max_length=64,
                        max_new_tokens=8, code_timeout=2.0, code_memory_mib=256)
    history = run(cfg, tmp_path / "run").history
    m = history[0]
    assert 0 <= m["global_accuracy"] <= 1 and m["global_loss"] > 0 and m["eval_tokens_per_s"] > 0
    assert (tmp_path / "run" / "global_adapter" / "adapter_config.json").is_file()
    # the wiring from data to sandbox: completions that are the reference solutions score 1, wrong ones 0
    fed = engine.Federation(cfg)
    answers = {tuple(p): a for p, a in zip(fed.data.test.prompts, fed.data.test.answers)}
    monkeypatch.setattr(CodeTask, "generate", lambda self, model, prompts: ([answers[tuple(p)] for p in prompts], 1))
    assert fed.evaluate(fed.global_tensors, fed.data.test)["accuracy"] == 1.0
    monkeypatch.setattr(CodeTask, "generate", lambda self, model, prompts: (["def nothing(): pass"] * len(prompts), 1))
    assert fed.evaluate(fed.global_tensors, fed.data.test)["accuracy"] == 0.0
