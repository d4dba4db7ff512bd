"""Partitioners: pure, seeded functions of (labels, number of clients, parameters) -> index arrays, one per client.

- iid: a random permutation cut into near-equal parts.
- dirichlet (label skew, Hsu et al. 2019, arXiv 1909.06335): for every class c, client shares p_c ~ Dir(α·1_U);
  the class's examples are dealt out in those proportions. Small α: each client sees few classes.
- shards (pathological non-IID after McMahan et al. 2017, arXiv 1602.05629): client u holds k labels, taken
  round-robin from a seeded permutation of the labels; each label's examples are split evenly among its
  holders. A client holds exactly min(k, #labels) labels; labels nobody holds (U·k < #labels) are left out.
- quantity: client sizes ~ Dir(α·1_U) of the whole pool, labels iid. Skews amounts, not classes.
A client may end up with no examples (strong skew, tiny data): the engine skips and counts it.
"""

from __future__ import annotations

import numpy as np

from florana.errors import FloranaError


def partition(labels: np.ndarray, num_clients: int, scheme: str, *, alpha: float = 0.5, shards_per_client: int = 2,
              seed: int = 0) -> list[np.ndarray]:
    labels = np.asarray(labels)
    n = len(labels)
    if num_clients > n:
        raise FloranaError(f"num_clients={num_clients} exceeds the {n} training examples")
    if alpha <= 0:
        raise FloranaError(f"alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = np.array_split(rng.permutation(n), num_clients)
    elif scheme == "dirichlet":
        buckets: list[list[int]] = [[] for _ in range(num_clients)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).round().astype(int)
            for u, chunk in enumerate(np.split(idx, cuts)):
                buckets[u].extend(chunk.tolist())
        parts = [np.array(sorted(b), dtype=int) for b in buckets]
    elif scheme == "shards":
        classes = rng.permutation(np.unique(labels))
        k = min(shards_per_client, len(classes))
        holders: dict[int, list[int]] = {int(c): [] for c in classes}
        for u in range(num_clients):
            for j in range(k):
                holders[int(classes[(u * k + j) % len(classes)])].append(u)
        buckets = [[] for _ in range(num_clients)]
        for c, owners in holders.items():
            idx = rng.permutation(np.flatnonzero(labels == c))
            for u, chunk in zip(owners, np.array_split(idx, max(len(owners), 1))):
                buckets[u].extend(chunk.tolist())
        parts = [np.array(sorted(b), dtype=int) for b in buckets]
    elif scheme == "quantity":
        shares = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * n).round().astype(int)
        parts = [np.sort(p) for p in np.split(rng.permutation(n), cuts)]
    else:
        raise FloranaError(f"unknown partition {scheme!r}; choose iid, dirichlet, shards or quantity")
    return [np.asarray(p, dtype=int) for p in parts]


def partition_stats(labels: np.ndarray, parts: list[np.ndarray], label_names: list[str]) -> list[dict]:
    """Per client: its size and label histogram (by label name)."""
    labels = np.asarray(labels)
    out = []
    for u, p in enumerate(parts):
        counts = np.bincount(labels[p], minlength=len(label_names)) if len(p) else np.zeros(len(label_names), int)
        out.append({"client": u, "size": int(len(p)),
                    "labels": {name: int(c) for name, c in zip(label_names, counts)}})
    return out
