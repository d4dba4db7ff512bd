"""Every aggregator against a dense reference: products, errors, error floors, bytes, invariances."""

import dataclasses
import math

import pytest
import torch

from factories import applied_update, ideal_update, make_clients
from florana.aggregation import METHODS, aggregate_adapters, client_weights
from florana.aggregation import florana as florana_method
from florana.errors import FloranaError
from florana.lora.base_delta import apply_change

ALL = list(METHODS)
SHARED_A = ("ffa", "rolora", "fedsvd")  # need every client to hold the same A (rolora: in its odd rounds)
MIXED = [m for m in ALL if METHODS[m].mixed_ranks]
EQUAL_RANK_ONLY = [m for m in ALL if not METHODS[m].mixed_ranks]  # rolora, lora_fair, fedsvd


def dense_error(result, clients, weights):
    """Overall ‖ΔW* − applied‖/‖ΔW*‖ and the Eckart–Young floor at the clients' rank, both densely."""
    err = tgt = floor = 0.0
    r = max(m.rank for a in clients for m in a.modules.values())
    for name in clients[0].modules:
        T = ideal_update(clients, weights, name)
        err += (T - applied_update(result, name)).pow(2).sum().item()
        tgt += T.pow(2).sum().item()
        floor += torch.linalg.svdvals(T)[r:].pow(2).sum().item()
    return math.sqrt(err / tgt), math.sqrt(floor / tgt)


def usable(method, kind):
    return not (method in SHARED_A and kind != "shared")


@pytest.mark.parametrize("kind", ["random", "lora", "shared"])
@pytest.mark.parametrize("method", ALL)
def test_reported_error_and_floor_match_dense_reference(method, kind):
    clients = make_clients(kind=kind, seed=1)
    if not usable(method, kind):
        with pytest.raises(FloranaError, match=f"client1: module .*lora_A differs.*{method} needs every client to "
                                               "keep the shared frozen A"):
            aggregate_adapters(clients, method)
        return
    w = [0.1, 0.2, 0.3, 0.4]
    result = aggregate_adapters(clients, method, weights=w)
    err, floor = dense_error(result, clients, w)
    assert result.report.relative_error == pytest.approx(err, abs=1e-5)
    assert result.report.error_floor == pytest.approx(floor, abs=1e-5)
    for name in clients[0].modules:
        T = ideal_update(clients, w, name)
        module_err = ((T - applied_update(result, name)).norm() / T.norm()).item()
        assert result.report.modules[name]["relative_error"] == pytest.approx(module_err, abs=1e-5)
    if METHODS[method].exact:
        assert err < 1e-6
    # nothing at rank r beats Eckart–Young; only the exact methods (rank > r or a dense residual) go below it
    if method not in ("flora", "fedex") and kind != "shared":
        assert err >= floor - 1e-6


@pytest.mark.parametrize("kind", ["random", "lora"])
def test_fedit_factors_are_weighted_means(kind):
    clients = make_clients(kind=kind, seed=2)
    w = torch.tensor([0.4, 0.3, 0.2, 0.1])
    out = aggregate_adapters(clients, "fedit", weights=w).adapter
    for name, m in out.modules.items():
        torch.testing.assert_close(m.A, sum(wu * a.modules[name].A for wu, a in zip(w, clients)))
        torch.testing.assert_close(m.B, sum(wu * a.modules[name].B for wu, a in zip(w, clients)))


def test_fedsa_and_ffa_share_fedits_factors_and_fedex_adds_the_exact_residual():
    clients = make_clients(kind="shared", seed=3)
    fedit = aggregate_adapters(clients, "fedit").adapter
    for method in ("fedsa", "ffa", "fedex"):
        other = aggregate_adapters(clients, method)
        for name, m in other.adapter.modules.items():
            torch.testing.assert_close(m.A, fedit.modules[name].A)
            torch.testing.assert_close(m.B, fedit.modules[name].B)
    lora = make_clients(kind="lora", seed=3)
    fedex = aggregate_adapters(lora, "fedex")
    for name in lora[0].modules:
        T = ideal_update(lora, [0.25] * 4, name)
        torch.testing.assert_close(applied_update(fedex, name), T, atol=1e-5, rtol=1e-5)
        assert fedex.report.modules[name]["lowrank_error"] > 0.01


def test_fedex_sends_its_residual_as_factors_where_they_are_smaller():
    """ΔW* − s·B̂Â has rank ≤ Σr_u + r: with 2 clients of rank 2 at 64×48 its factors (6·112 values) beat the dense
    4096 and travel instead; the base a client builds from them (apply_change, as nodes do) is the exact residual
    to float32 rounding, equal to what the dense path sends; the report books what is sent. Where the factors are
    not smaller (12×10 at rank 3) the dense residual travels, as before."""
    shapes = {"q": (64, 48), "v": (64, 48)}
    clients = make_clients(num=2, rank=2, kind="lora", seed=31, shapes=shapes)
    result = aggregate_adapters(clients, "fedex")
    names = list(clients[0].modules)
    assert sorted(result.base_change) == sorted(f"{n}.{f}" for n in names for f in "AB")
    base = apply_change({}, result.base_change)
    for name in names:
        B, A = result.base_change[f"{name}.B"], result.base_change[f"{name}.A"]
        assert B.shape == (64, 6) and A.shape == (6, 48) and B.dtype == A.dtype == torch.float32
        m = result.adapter.modules[name]
        exact = ideal_update(clients, [0.5, 0.5], name) - result.adapter.scaling(name) * (m.B.double() @ m.A.double())
        dense_path = exact.float()  # what fedex sent before: the float64 residual rounded to float32
        torch.testing.assert_close(base[name].double(), exact, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(base[name], dense_path, rtol=1e-5, atol=1e-6)
        assert torch.equal(base[name], result.base_update[name])  # the server's update is what clients compute
    factors = sum(6 * (64 + 48) for _ in shapes)
    assert result.report.values_down_per_client == [sum(2 * (64 + 48) for _ in shapes) + factors] * 2
    assert result.report.bytes_down_per_client == [4 * v for v in result.report.values_down_per_client]
    dense = aggregate_adapters(make_clients(num=4, rank=3, kind="lora", seed=31), "fedex")
    assert all(k.endswith(".delta") for k in dense.base_change)


def test_svd_is_the_eckart_young_optimum():
    clients = make_clients(kind="random", seed=4)
    result = aggregate_adapters(clients, "svd")
    for name in clients[0].modules:
        T = ideal_update(clients, [0.25] * 4, name)
        U, S, Vh = torch.linalg.svd(T)
        best = (U[:, :3] * S[:3]) @ Vh[:3]
        torch.testing.assert_close(applied_update(result, name), best, atol=1e-4, rtol=1e-4)
        # gauge: Â carries the clients' mean ‖A_u‖_F
        mean_norm = sum(a.modules[name].A.norm() for a in clients) / 4
        assert result.adapter.modules[name].A.norm().item() == pytest.approx(mean_norm.item(), rel=1e-4)


@pytest.mark.parametrize("kind", ["random", "lora"])
def test_florana_never_worse_than_fedit_and_stationary(kind):
    clients = make_clients(num=5, kind=kind, seed=5)
    fedit = aggregate_adapters(clients, "fedit").report
    ours = aggregate_adapters(clients, METHODS["florana"].configured(prox=0.0)).report  # the paper's Eq. 6 alone
    for name, m in ours.modules.items():
        assert m["relative_error"] <= fedit.modules[name]["relative_error"] + 1e-9
        assert sum(m["P"]) == pytest.approx(1.0)  # gauge
    assert ours.relative_error < fedit.relative_error  # strictly better on drifted clients
    # fedit_error is FedIT's exact-arithmetic error; fedit's report measures its float32 outputs: equal to rounding
    assert ours.fedit_error == pytest.approx(fedit.relative_error, rel=1e-6)
    # stationarity of the returned P, Q, checked with an independent dense loss and autograd
    name = next(iter(clients[0].modules))
    P = torch.tensor(ours.modules[name]["P"], dtype=torch.float64, requires_grad=True)
    Q = torch.tensor(ours.modules[name]["Q"], dtype=torch.float64, requires_grad=True)
    s = clients[0].scaling(name)
    Bs = [a.modules[name].B.double() for a in clients]
    As = [a.modules[name].A.double() for a in clients]
    T = ideal_update(clients, [0.2] * 5, name)
    E = s * sum(q * b for q, b in zip(Q, Bs)) @ sum(p * a for p, a in zip(P, As)) - T
    loss = E.pow(2).sum()
    loss.backward()
    scale = T.pow(2).sum().item()
    assert P.grad.norm().item() / scale < 1e-5
    assert Q.grad.norm().item() / scale < 1e-5


@pytest.mark.parametrize("ranks", [None, [2, 4, 3, 4]])
@pytest.mark.parametrize("method", ALL)
def test_client_order_does_not_matter(method, ranks):
    if ranks is not None and not METHODS[method].mixed_ranks:
        with pytest.raises(FloranaError, match=f"{method} needs equal ranks"):
            aggregate_adapters(make_clients(kind="shared", ranks=ranks, seed=7), method)
        return
    clients = make_clients(kind="shared" if method in SHARED_A else "lora", ranks=ranks, seed=7)
    w = [0.1, 0.2, 0.3, 0.4]
    order = [2, 0, 3, 1]
    a = aggregate_adapters(clients, method, weights=w)
    b = aggregate_adapters([clients[i] for i in order], method, weights=[w[i] for i in order])
    # the error is measured on float32 outputs, whose rounding depends on the summation order
    assert a.report.relative_error == pytest.approx(b.report.relative_error, abs=1e-7)
    for name in clients[0].modules:
        torch.testing.assert_close(applied_update(a, name), applied_update(b, name), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rank", [None, 5])
@pytest.mark.parametrize("method", ALL)
def test_identical_clients_give_back_that_client(method, rank):
    """Also at a global rank above the clients' (a run's largest rank): the same product, padded."""
    one = make_clients(num=1, kind="random", seed=8)[0]
    result = aggregate_adapters([one] * 3, method, rank=rank)
    assert result.report.relative_error < 1e-6
    for name, m in one.modules.items():
        torch.testing.assert_close(applied_update(result, name), one.scaling(name) * (m.B.double() @ m.A.double()),
                                   atol=1e-4, rtol=1e-4)
        if method in ("fedit", "ffa", "fedsa", "florana", "fedex", "hetlora", "rolora", "lora_fair"):
            torch.testing.assert_close(result.adapter.modules[name].A[: m.rank], m.A)
            torch.testing.assert_close(result.adapter.modules[name].B[:, : m.rank], m.B)
            assert not result.adapter.modules[name].A[m.rank:].any()


@pytest.mark.parametrize("method", MIXED)
def test_mixed_ranks_and_rslora(method):
    clients = make_clients(ranks=[2, 4, 3], kind="shared" if method == "ffa" else "lora", rslora=True, seed=9)
    result = aggregate_adapters(clients, method)
    err, floor = dense_error(result, clients, [1 / 3] * 3)
    assert result.report.relative_error == pytest.approx(err, abs=1e-5)
    if method in ("svd", "flexlora"):
        assert err == pytest.approx(floor, abs=1e-5)
    elif METHODS[method].exact:
        assert err < 1e-6
    if method != "flora":
        assert result.adapter.config["r"] == 4
    if method == "flora":
        assert result.adapter.config["r"] == 9
        # the scaling survives the rank change: alpha / sqrt(9) == client 0's alpha / sqrt(2)
        assert result.adapter.scaling(next(iter(result.adapter.modules))) == pytest.approx(6 / 2 ** 0.5)


def test_a_method_that_needs_equal_ranks_refuses_mixed_ones():
    strict = dataclasses.replace(METHODS["fedit"], name="strict", mixed_ranks=False)
    clients = make_clients(ranks=[2, 4], kind="shared", seed=10)
    with pytest.raises(FloranaError, match=r"client1: module .* rank 4 differs .* strict needs equal ranks \(fedit, "):
        aggregate_adapters(clients, strict)


@pytest.mark.parametrize("method", EQUAL_RANK_ONLY)
def test_the_methods_that_need_equal_ranks_refuse_mixed_ones_by_name(method):
    """rolora, lora_fair and fedsvd take clients of one rank; mixed ones are refused naming the method and those
    that accept them."""
    assert EQUAL_RANK_ONLY == ["rolora", "lora_fair", "fedsvd"]
    clients = make_clients(ranks=[2, 4], kind="shared", seed=10)
    with pytest.raises(FloranaError, match=rf"client1: module .* rank 4 differs .* {method} needs equal ranks \(fedit, "
                                           r"ffa, fedsa, flora, fedex, florana, svd, hetlora, flexlora accept"):
        aggregate_adapters(clients, method, round_=2)


# ---- mixed ranks against dense references ----------------------------------------------------------------
RANKS = [2, 4, 3]
W = [0.2, 0.5, 0.3]


def pad_B(B, r):
    return torch.cat([B.double(), torch.zeros(B.shape[0], r - B.shape[1], dtype=torch.float64)], dim=1)


def pad_A(A, r):
    return torch.cat([A.double(), torch.zeros(r - A.shape[0], A.shape[1], dtype=torch.float64)], dim=0)


def padded_means(clients, name, weights, scale, r):
    """HetLoRA's padding, densely: Σ w_u s_u [B_u 0] / scale and Σ w_u [A_u; 0]."""
    B = sum(w * a.scaling(name) * pad_B(a.modules[name].B, r) for w, a in zip(weights, clients)) / scale
    A = sum(w * pad_A(a.modules[name].A, r) for w, a in zip(weights, clients))
    return B, A


def best_rank(T, r):
    U, S, Vh = torch.linalg.svd(T)
    return (U[:, :r] * S[:r]) @ Vh[:r]


@pytest.mark.parametrize("method", MIXED)
def test_mixed_ranks_match_dense_references(method):
    """Clients of ranks 2, 4, 3 with α/r scalings (3, 1.5, 2): each method's factors and products against the same
    computation done densely on zero-padded factors; the global adapter has rank 4 at the rank-4 client's scaling."""
    clients = make_clients(ranks=RANKS, kind="shared" if method == "ffa" else "lora", seed=20)
    # florana: the paper's Eq. 6 alone, whose stationarity is checked below
    result = aggregate_adapters(clients, METHODS[method].configured(prox=0.0) if method == "florana" else method,
                                weights=W)
    err, floor = dense_error(result, clients, W)
    assert result.report.relative_error == pytest.approx(err, abs=1e-5)
    assert result.report.error_floor == pytest.approx(floor, abs=1e-5)
    out = result.adapter
    for name in clients[0].modules:
        T = ideal_update(clients, W, name)
        m = out.modules[name]
        B, A = m.B.double(), m.A.double()
        if method == "flora":
            assert m.rank == 9
            continue
        assert m.rank == 4 and out.scaling(name) == pytest.approx(1.5)
        if method in ("fedit", "fedsa", "fedex", "hetlora"):
            weights = W
            if method == "hetlora":  # w'_u ∝ w_u ‖s_u B_u A_u‖_F per module
                norms = [a.scaling(name) * (a.modules[name].B.double() @ a.modules[name].A.double()).norm()
                         for a in clients]
                raw = torch.tensor([w * n for w, n in zip(W, norms)])
                weights = (raw / raw.sum()).tolist()
                assert result.report.modules[name]["hetlora_weights"] == pytest.approx(weights, rel=1e-9)
            B_ref, A_ref = padded_means(clients, name, weights, 1.5, 4)
            torch.testing.assert_close(B, B_ref, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(A, A_ref, rtol=1e-5, atol=1e-6)
        if method == "ffa":  # exact: the shared A at rank 4 is the rank-4 client's, B the padded mean
            assert torch.equal(m.A, clients[1].modules[name].A)
            torch.testing.assert_close(B, padded_means(clients, name, W, 1.5, 4)[0], rtol=1e-5, atol=1e-6)
        if method == "florana":  # never worse than padded FedIT, and stationary on the padded factors
            B_f, A_f = padded_means(clients, name, W, 1.5, 4)
            assert (T - applied_update(result, name)).norm() <= (T - 1.5 * B_f @ A_f).norm() * (1 + 1e-6)
            rep = result.report.modules[name]
            P = torch.tensor(rep["P"], dtype=torch.float64, requires_grad=True)
            Q = torch.tensor(rep["Q"], dtype=torch.float64, requires_grad=True)
            Bs = [a.scaling(name) * pad_B(a.modules[name].B, 4) for a in clients]
            As = [pad_A(a.modules[name].A, 4) for a in clients]
            loss = (sum(q * b for q, b in zip(Q, Bs)) @ sum(p * a for p, a in zip(P, As)) - T).pow(2).sum()
            loss.backward()
            assert P.grad.norm().item() / T.pow(2).sum().item() < 1e-5
            assert Q.grad.norm().item() / T.pow(2).sum().item() < 1e-5
        if method in ("svd", "flexlora"):  # Eckart–Young at rank 4, and a client's first r components at rank r
            torch.testing.assert_close(1.5 * B @ A, best_rank(T, 4), rtol=1e-4, atol=1e-5)
            for r in RANKS:
                torch.testing.assert_close(1.5 * B[:, :r] @ A[:r], best_rank(T, r), rtol=1e-4, atol=1e-5)
        if method == "flexlora":  # the paper's split: A = V_rᵀ (orthonormal rows), s·B = U_r Σ_r
            torch.testing.assert_close(A @ A.T, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-5)
            S = torch.linalg.svdvals(T)[:4]
            torch.testing.assert_close((1.5 * B).norm(dim=0), S, rtol=1e-4, atol=1e-6)
        if METHODS[method].exact:
            torch.testing.assert_close(applied_update(result, name), T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", MIXED)
def test_a_global_rank_above_the_clients_pads_or_fills(method):
    """A run asks for its largest rank whatever clients a round sampled: the methods that pad add zero components;
    svd and flexlora give ΔW*'s best rank 6 (ΔW* has rank 2+4+3); flora's stack is what it is."""
    clients = make_clients(ranks=RANKS, kind="shared" if method == "ffa" else "lora", seed=21)
    base = aggregate_adapters(clients, method, weights=W)
    wide = aggregate_adapters(clients, method, weights=W, rank=6)
    err, _ = dense_error(wide, clients, W)
    assert wide.report.relative_error == pytest.approx(err, abs=1e-5)
    for name in clients[0].modules:
        m = wide.adapter.modules[name]
        if method == "flora":
            assert m.rank == 9
            continue
        assert m.rank == 6 and wide.adapter.scaling(name) == pytest.approx(1.5)  # the rank-4 client's scaling
        T = ideal_update(clients, W, name)
        if method in ("svd", "flexlora"):
            torch.testing.assert_close(applied_update(wide, name), best_rank(T, 6), rtol=1e-4, atol=1e-5)
        else:
            assert not m.B[:, 4:].any() and not m.A[4:].any()
            torch.testing.assert_close(m.B[:, :4], base.adapter.modules[name].B)
            torch.testing.assert_close(m.A[:4], base.adapter.modules[name].A)
    with pytest.raises(FloranaError, match="the global rank 3 is below a client's rank 4"):
        aggregate_adapters(clients, method, weights=W, rank=3)


def test_wide_rank_is_floored_at_that_rank():
    clients = make_clients(ranks=RANKS, kind="lora", seed=21)
    rep = aggregate_adapters(clients, "svd", weights=W, rank=6).report
    name = next(iter(clients[0].modules))
    T = ideal_update(clients, W, name)
    S = torch.linalg.svdvals(T)
    assert rep.modules[name]["error_floor"] == pytest.approx((S[6:].pow(2).sum().sqrt() / T.norm()).item(), abs=1e-6)


def test_flexlora_completes_zero_singular_values_inside_the_clients_span():
    """ΔW* of rank 2 (the second client's B is zero) at global rank 4: the two components past ΔW*'s rank have zero
    B columns and A rows that complete V orthonormally inside the span of the clients' A rows, so every slot of a
    client's A is a unit vector that can train (not a dead zero row)."""
    clients = make_clients(num=2, rank=2, kind="random", seed=22)
    for name, m in clients[1].modules.items():
        clients[1].modules[name] = type(m)(A=m.A, B=torch.zeros_like(m.B))
    result = aggregate_adapters(clients, "flexlora", rank=4)
    for name in clients[0].modules:
        m = result.adapter.modules[name]
        A, B = m.A.double(), m.B.double()
        torch.testing.assert_close(A @ A.T, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-5)
        assert B[:, 2:].abs().max() < 1e-5 * B[:, :2].abs().max()
        span = torch.cat([a.modules[name].A.double() for a in clients])  # the rows of A lie in the clients' span
        coef = torch.linalg.lstsq(span.T, A.T).solution
        torch.testing.assert_close(span.T @ coef, A.T, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(applied_update(result, name), ideal_update(clients, [0.5, 0.5], name),
                                   rtol=1e-5, atol=1e-6)


def test_ffa_with_mixed_ranks_needs_the_shared_a_prefix():
    clients = make_clients(ranks=[2, 4], kind="shared", seed=23)
    name = next(iter(clients[0].modules))
    m = clients[0].modules[name]
    clients[0].modules[name] = type(m)(A=m.A + 0.1, B=m.B)
    with pytest.raises(FloranaError, match=rf"client0: module {name}: lora_A differs from client1's; ffa needs every "
                                           r"client to keep the shared frozen A \(its first r rows at rank r\)"):
        aggregate_adapters(clients, "ffa")


def test_bytes_with_mixed_ranks():
    """Each client sends and receives at its own rank (it gets the first r_u global components): r_u(d+k) per
    module for the methods that send both factors; flora sends every client the whole stack."""
    clients = make_clients(ranks=RANKS, kind="shared", extra=True, seed=24)
    d_k = [(12, 10), (12, 10), (12, 10), (16, 10)]
    head, R = 2 * 10, sum(RANKS)
    per = {
        "ffa": lambda r: (sum(r * d for d, k in d_k), sum(r * d for d, k in d_k)),
        "fedsa": lambda r: (sum(r * k for d, k in d_k), sum(r * k for d, k in d_k)),
        "flora": lambda r: (sum(r * (d + k) for d, k in d_k), sum(R * (d + k) for d, k in d_k)),
        "fedex": lambda r: (sum(r * (d + k) for d, k in d_k), sum(r * (d + k) + d * k for d, k in d_k)),
    }
    both = lambda r: (sum(r * (d + k) for d, k in d_k), sum(r * (d + k) for d, k in d_k))  # noqa: E731
    for method in MIXED:
        rep = aggregate_adapters(clients, method, rank=8).report
        expect = [per.get(method, both)(r) for r in RANKS]
        assert rep.values_up_per_client == [up + head for up, _ in expect], method
        assert rep.values_down_per_client == [down + head for _, down in expect], method
        assert rep.bytes_down_per_client == [4 * (down + head) for _, down in expect], method


def test_bytes_on_the_wire():
    clients = make_clients(num=3, rank=2, kind="shared", extra=True, seed=11)
    d_k = [(12, 10), (12, 10), (12, 10), (16, 10)]
    head = 2 * 10
    r = 2
    expect = {
        "fedit": (sum(r * (d + k) for d, k in d_k), sum(r * (d + k) for d, k in d_k)),
        "florana": (sum(r * (d + k) for d, k in d_k), sum(r * (d + k) for d, k in d_k)),
        "svd": (sum(r * (d + k) for d, k in d_k), sum(r * (d + k) for d, k in d_k)),
        "hetlora": (sum(r * (d + k) for d, k in d_k), sum(r * (d + k) for d, k in d_k)),
        "flexlora": (sum(r * (d + k) for d, k in d_k), sum(r * (d + k) for d, k in d_k)),
        "ffa": (sum(r * d for d, k in d_k), sum(r * d for d, k in d_k)),
        "fedsa": (sum(r * k for d, k in d_k), sum(r * k for d, k in d_k)),
        "flora": (sum(r * (d + k) for d, k in d_k), sum(3 * r * (d + k) for d, k in d_k)),
        "fedex": (sum(r * (d + k) for d, k in d_k), sum(r * (d + k) + d * k for d, k in d_k)),
        "lora_fair": (sum(r * (d + k) for d, k in d_k), sum(r * (d + k) for d, k in d_k)),
        # round 1 (the default): rolora's clients train B and send it, which comes back averaged; fedsvd's server
        # re-factors (period 1), so A comes down too
        "rolora": (sum(r * d for d, k in d_k), sum(r * d for d, k in d_k)),
        "fedsvd": (sum(r * d for d, k in d_k), sum(r * (d + k) for d, k in d_k)),
    }
    assert set(expect) == set(METHODS)
    for method, (up, down) in expect.items():
        rep = aggregate_adapters(clients, method).report
        assert rep.values_up_per_client == [up + head] * 3, method
        assert rep.values_down_per_client == [down + head] * 3, method
        assert rep.bytes_up_per_client == [4 * (up + head)] * 3
        assert rep.to_json()["bytes_down_total"] == 3 * 4 * (down + head)


def test_non_lora_tensors_are_averaged_with_the_client_weights():
    clients = make_clients(num=3, kind="lora", extra=True, seed=12)
    w = [1.0, 1.0, 2.0]
    out = aggregate_adapters(clients, "florana", weights=w).adapter
    key = "base_model.model.head.weight"
    expect = sum(wu / 4 * a.extra[key] for wu, a in zip(w, clients))
    torch.testing.assert_close(out.extra[key], expect)


def test_bfloat16_clients_keep_their_dtype():
    clients = make_clients(kind="lora", seed=13, dtype=torch.bfloat16)
    result = aggregate_adapters(clients, "florana")
    assert all(m.A.dtype == torch.bfloat16 for m in result.adapter.modules.values())
    assert result.report.bytes_up_per_client[0] == 2 * result.report.values_up_per_client[0]


@pytest.mark.parametrize("method", ["ffa", "flora", "fedex", "florana", "svd", "rolora", "fedsvd", "lora_fair"])
def test_bfloat16_outputs_report_the_error_they_really_have(method):
    """The report measures the factors as output (rounded to bf16), and fedex's residual is kept in float32, so
    the exact methods are exact only where their outputs are: the report says which."""
    clients = make_clients(kind="shared" if method in SHARED_A else "lora", seed=8, dtype=torch.bfloat16)
    w = [0.1, 0.2, 0.3, 0.4]
    result = aggregate_adapters(clients, method, weights=w)
    err, _ = dense_error(result, clients, w)  # densely, from the bf16 outputs themselves
    assert result.report.relative_error == pytest.approx(err, rel=1e-3, abs=1e-7)
    if method in ("ffa", "flora", "rolora", "fedsvd"):
        assert err > 1e-4  # bf16 factors are not exact, whatever the method promises in exact arithmetic
    if method == "fedex":
        assert all(t.dtype == torch.float32 for t in result.base_update.values())
        assert err < 1e-6


@pytest.mark.parametrize("weights, message", [
    ([1, -1, 1, 1], "finite and >= 0"),
    ([0, 0, 0, 0], "all zero"),
    ([1, float("nan"), 1, 1], "finite"),
    ([1, 1], "2 client weights for 4 clients"),
])
def test_bad_weights_are_refused(weights, message):
    with pytest.raises(FloranaError, match=message):
        aggregate_adapters(make_clients(seed=14), "fedit", weights=weights)


def test_weights_normalise_and_default_to_uniform():
    torch.testing.assert_close(client_weights(None, 4), torch.full((4,), 0.25, dtype=torch.float64))
    torch.testing.assert_close(client_weights([10, 30], 2), torch.tensor([0.25, 0.75], dtype=torch.float64))


def test_nan_factor_names_client_and_module():
    clients = make_clients(seed=15)
    clients[2].modules["base_model.model.mlp.up"].B[0, 0] = float("nan")
    with pytest.raises(FloranaError, match=r"client2: module base_model.model.mlp.up: lora_B holds NaN"):
        aggregate_adapters(clients, "florana")


def test_unknown_method_and_no_clients():
    with pytest.raises(FloranaError, match="unknown method 'fedavgx'"):
        aggregate_adapters(make_clients(seed=16), "fedavgx")
    with pytest.raises(FloranaError, match="at least one client"):
        aggregate_adapters([], "fedit")


def test_florana_loss_and_gradients_match_dense():
    """The Gram-block loss, J and gradients equal their dense definitions at arbitrary P, Q."""
    clients = make_clients(num=3, kind="random", seed=17)
    from florana.aggregation.factors import ClientFactors

    name = "base_model.model.layer.0.q"
    B = torch.cat([a.modules[name].B for a in clients], 1)[None]
    A = torch.cat([a.modules[name].A for a in clients], 0)[None]
    w = client_weights([1, 2, 3], 3)
    cf = ClientFactors(B=B, A=A, ranks=(3, 3, 3), scales=(2.0, 2.0, 2.0), weights=w)
    Gb = florana_method.blocks(cf.gram_B * 4.0, 3)
    Ga = florana_method.blocks(cf.gram_A, 3)
    J, TT = florana_method.cross_terms(Gb, Ga, w)
    P = torch.tensor([[0.5, -0.2, 0.7]], dtype=torch.float64, requires_grad=True)
    Q = torch.tensor([[1.1, 0.3, -0.4]], dtype=torch.float64, requires_grad=True)
    Bs = [2.0 * a.modules[name].B.double() for a in clients]
    As = [a.modules[name].A.double() for a in clients]
    T = sum(wu * b @ a for wu, b, a in zip(w, Bs, As))
    dense = (sum(q * b for q, b in zip(Q[0], Bs)) @ sum(p * a for p, a in zip(P[0], As)) - T).pow(2).sum()
    dense.backward()
    ours = florana_method.loss(Gb, Ga, J, TT, P.detach(), Q.detach())
    assert ours.item() == pytest.approx(dense.item(), rel=1e-9)
    assert TT.item() == pytest.approx(T.pow(2).sum().item(), rel=1e-9)
    assert J[0, 1, 2].item() == pytest.approx((Bs[1] @ As[2] * T).sum().item(), rel=1e-9)
    grad_P, grad_Q = florana_method.gradients(Gb, Ga, J, P.detach(), Q.detach())
    torch.testing.assert_close(grad_P, P.grad)
    torch.testing.assert_close(grad_Q, Q.grad)


def test_florana_scales_to_a_hundred_clients():
    clients = make_clients(num=100, rank=2, kind="lora", seed=18, shapes={"layer.0.q": (12, 10)})
    fedit = aggregate_adapters(clients, "fedit").report.relative_error
    ours = aggregate_adapters(clients, "florana").report.relative_error
    assert ours <= fedit + 1e-12
