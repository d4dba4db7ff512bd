"""Partitioners: disjoint, covering, seeded, and each scheme's defining property."""

import numpy as np
import pytest

from florana.data import partition, partition_stats
from florana.errors import FloranaError

LABELS = np.repeat(np.arange(4), 250)  # 4 classes × 250


def label_entropy(labels, parts):
    out = []
    for p in parts:
        if len(p):
            q = np.bincount(labels[p], minlength=4) / len(p)
            q = q[q > 0]
            out.append(-(q * np.log(q)).sum())
    return float(np.mean(out))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards", "quantity"])
def test_disjoint_covering_and_seeded(scheme):
    parts = partition(LABELS, 10, scheme, alpha=0.5, seed=3)
    joined = np.concatenate(parts)
    assert len(parts) == 10
    assert sorted(joined.tolist()) == list(range(len(LABELS)))
    again = partition(LABELS, 10, scheme, alpha=0.5, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition(LABELS, 10, scheme, alpha=0.5, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_iid_sizes_are_even():
    sizes = [len(p) for p in partition(LABELS, 7, "iid", seed=0)]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_skew_grows_as_alpha_shrinks():
    iid = label_entropy(LABELS, partition(LABELS, 10, "iid", seed=0))
    mild = np.mean([label_entropy(LABELS, partition(LABELS, 10, "dirichlet", alpha=10.0, seed=s)) for s in range(5)])
    strong = np.mean([label_entropy(LABELS, partition(LABELS, 10, "dirichlet", alpha=0.1, seed=s)) for s in range(5)])
    assert iid > mild > strong


def test_shards_give_at_most_k_labels():
    for p in partition(LABELS, 8, "shards", shards_per_client=2, seed=1):
        assert len(np.unique(LABELS[p])) <= 2


def test_quantity_skews_sizes_not_labels():
    parts = partition(LABELS, 10, "quantity", alpha=0.3, seed=2)
    sizes = np.array([len(p) for p in parts])
    assert sizes.max() > 3 * max(sizes.min(), 1)
    big = parts[int(sizes.argmax())]
    assert len(np.unique(LABELS[big])) == 4


def test_bad_parameters():
    with pytest.raises(FloranaError, match="num_clients=2000 exceeds the 1000 training examples"):
        partition(LABELS, 2000, "iid")
    with pytest.raises(FloranaError, match="alpha must be > 0"):
        partition(LABELS, 5, "dirichlet", alpha=0)
    with pytest.raises(FloranaError, match="unknown partition 'zipf'"):
        partition(LABELS, 5, "zipf")


def test_stats():
    parts = partition(LABELS, 3, "shards", shards_per_client=2, seed=0)
    stats = partition_stats(LABELS, parts, ["a", "b", "c", "d"])
    assert [s["size"] for s in stats] == [len(p) for p in parts]
    assert sum(sum(s["labels"].values()) for s in stats) == len(LABELS)
