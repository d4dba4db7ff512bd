"""FLoRA-NA's ablation options (solver, proximal term, gauge), svd's split and the per-round diagnostics, each
against a dense reference or an independent property it must have."""

import pytest
import torch

from factories import ideal_update, make_clients
from florana.aggregation import METHODS, aggregate_adapters
from florana.aggregation import florana as fl
from florana.aggregation.factors import ClientFactors
from florana.aggregation.linalg import padded_blocks
from florana.config import RunConfig
from florana.errors import FloranaError
from florana.federation.compare import plan_runs
from florana.federation.methods import method_of

W = [0.1, 0.2, 0.3, 0.25, 0.15]
FLORANA, SVD = METHODS["florana"], METHODS["svd"]


def clients5(seed=5, **kw):
    return make_clients(num=5, kind="lora", seed=seed, **kw)


def products(result):
    """s·B̂Â per module, densely (float64)."""
    return {n: result.adapter.scaling(n) * (m.B.double() @ m.A.double()) for n, m in result.adapter.modules.items()}


def dense_loss(clients, name, P, Q):
    """‖s·(Σ Q_u B_u)(Σ P_v A_v) − ΔW*‖² with the clients' own scalings, densely."""
    T = ideal_update(clients, W, name)
    Bs = [a.scaling(name) * a.modules[name].B.double() for a in clients]
    As = [a.modules[name].A.double() for a in clients]
    return (sum(q * b for q, b in zip(Q, Bs)) @ sum(p * a for p, a in zip(P, As)) - T).pow(2).sum()


# ---- the gauge changes the split, never the product ------------------------------------------------------
@pytest.mark.parametrize("ranks", [None, [2, 3, 3, 1, 3]])
@pytest.mark.parametrize("method, option, values", [
    ("florana", "gauge", fl.GAUGES), ("svd", "split", ("client_norm", "balanced", "b"))])
def test_every_gauge_keeps_the_product_and_the_error(method, option, values, ranks):
    clients = clients5(ranks=ranks)
    default = aggregate_adapters(clients, method, weights=W)
    for value in values:
        got = aggregate_adapters(clients, METHODS[method].configured(**{option: value}), weights=W)
        assert got.report.relative_error == pytest.approx(default.report.relative_error, rel=1e-9, abs=1e-12)
        for name, T in products(default).items():
            torch.testing.assert_close(products(got)[name], T, rtol=1e-5, atol=1e-6)
        for name, m in got.adapter.modules.items():
            A, B = m.A.double(), m.B.double()
            if value == "balanced":
                assert A.norm().item() == pytest.approx(B.norm().item(), rel=1e-5)
            if value == "client_norm":
                mean = sum(w * a.modules[name].A.double().norm() for w, a in zip(W, clients))
                assert A.norm().item() == pytest.approx(mean.item(), rel=1e-5)
            if value == "fedit_norm":  # FedIT's Â on the same clients, for mixed ranks at the global rank
                fedit = aggregate_adapters(clients, "fedit", weights=W).adapter.modules[name].A.double()
                assert A.norm().item() == pytest.approx(fedit.norm().item(), rel=1e-5)
            if value == "sum_p":
                assert sum(got.report.modules[name]["P"]) == pytest.approx(1.0, abs=1e-9)
            if value == "b":  # Â has orthonormal rows, s·B̂'s columns are ΔW*'s singular values: FlexLoRA's split
                r = A.shape[0]
                torch.testing.assert_close(A @ A.T, torch.eye(r, dtype=A.dtype), rtol=0, atol=1e-5)
                S = torch.linalg.svdvals(ideal_update(clients, W, name))[:r]
                torch.testing.assert_close(got.adapter.scaling(name) * B.norm(dim=0), S, rtol=1e-4, atol=1e-6)
    # the default is not already balanced: the balanced gauge moved something
    m = default.adapter.modules[next(iter(default.adapter.modules))]
    assert abs(m.A.norm().item() - m.B.norm().item()) > 0.1 * m.A.norm().item()


def test_svd_balanced_balances_every_component():
    got = aggregate_adapters(clients5(), SVD.configured(split="balanced"), weights=W)
    for m in got.adapter.modules.values():
        torch.testing.assert_close(m.B.double().norm(dim=0), m.A.double().norm(dim=1), rtol=1e-5, atol=1e-7)


# ---- the gradient solver ----------------------------------------------------------------------------------
@pytest.mark.parametrize("ranks", [None, [2, 3, 3, 1, 3]])
def test_gradient_steps_lower_the_loss_from_fedit(ranks):
    clients = clients5(ranks=ranks)
    fedit = aggregate_adapters(clients, "fedit", weights=W).report.relative_error
    names = list(clients[0].modules)
    errors = [aggregate_adapters(clients, FLORANA.configured(solver="gradient", steps=k, prox=0.0), weights=W).report
              for k in (1, 2, 5, 20, 200)]
    per_module = [[r.modules[n]["relative_error"] for n in names] for r in errors]
    for before, after in zip(per_module, per_module[1:]):
        assert all(b2 <= b1 + 1e-12 for b1, b2 in zip(before, after))  # every module, every step count
    assert errors[0].relative_error < fedit  # one step already helps
    assert errors[-1].relative_error < errors[0].relative_error
    assert errors[-1].diagnostics["florana_sweeps_max"] == 200


def test_one_gradient_step_is_the_dense_lipschitz_step():
    """Q ← w − ∇_Q L / (2 λ_max(H_Q)), then P likewise at the new Q, with H and the gradients computed densely."""
    clients = clients5()
    name = next(iter(clients[0].modules))
    got = aggregate_adapters(clients, FLORANA.configured(solver="gradient", steps=1, prox=0.0),
                             weights=W).report.modules[name]
    w = torch.tensor(W, dtype=torch.float64)
    Bs = [a.scaling(name) * a.modules[name].B.double() for a in clients]
    As = [a.modules[name].A.double() for a in clients]

    def lipschitz_step(x, loss_of, vectors):
        x = x.clone().requires_grad_(True)
        loss_of(x).backward()
        V = torch.stack([v.flatten() for v in vectors])  # the loss is ‖V ᵀx − t‖²: Hessian 2VVᵀ
        return (x - x.grad / (2 * torch.linalg.eigvalsh(V @ V.T)[-1])).detach()

    A_bar = sum(p * a for p, a in zip(w, As))
    Q = lipschitz_step(w, lambda q: dense_loss(clients, name, w, q), [b @ A_bar for b in Bs])
    B_bar = sum(q * b for q, b in zip(Q, Bs))
    P = lipschitz_step(w, lambda p: dense_loss(clients, name, p, Q), [B_bar @ a for a in As])
    c = P.sum()  # the reported weights carry the gauge Σ P = 1
    torch.testing.assert_close(torch.tensor(got["P"], dtype=torch.float64), P / c, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(torch.tensor(got["Q"], dtype=torch.float64), Q * c, rtol=1e-6, atol=1e-9)


# ---- the proximal term ------------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", fl.SOLVERS)
def test_the_error_grows_with_prox_from_the_free_fit_to_fedit(solver):
    clients = clients5()
    fedit = aggregate_adapters(clients, "fedit", weights=W).report.relative_error
    huge = aggregate_adapters(clients, FLORANA.configured(solver=solver, prox=1e9), weights=W).report
    for m in huge.modules.values():
        assert m["P"] == pytest.approx(W, abs=1e-7) and m["Q"] == pytest.approx(W, abs=1e-7)
    assert huge.relative_error == pytest.approx(fedit, rel=1e-6)
    free = aggregate_adapters(clients, FLORANA.configured(solver=solver, prox=0.0), weights=W).report
    mid = aggregate_adapters(clients, FLORANA.configured(solver=solver, prox=0.05), weights=W).report
    default = aggregate_adapters(clients, FLORANA.configured(solver=solver), weights=W).report  # λ = 10
    assert free.relative_error < mid.relative_error < default.relative_error < fedit


def test_prox_als_is_stationary_for_the_proximal_objective():
    """solve_weights with λ > 0 ends where the gradient of L + λ‖ΔW*‖²(‖P−w‖² + ‖Q−w‖²), taken densely, vanishes."""
    clients = clients5()
    names = list(clients[0].modules)[:3]  # the three 12×10 modules batch together
    B = torch.stack([torch.cat([a.modules[n].B for a in clients], dim=1) for n in names])
    A = torch.stack([torch.cat([a.modules[n].A for a in clients], dim=0) for n in names])
    cf = ClientFactors(B=B, A=A, ranks=(3,) * 5, scales=tuple(a.scaling(names[0]) for a in clients),
                       weights=torch.tensor(W, dtype=torch.float64))
    s = cf.scales[0]
    w = cf.weights
    P, Q, sweeps = fl.solve_weights(padded_blocks(cf.gram_B * s * s, cf.ranks), padded_blocks(cf.gram_A, cf.ranks),
                                    w, prox=0.1)
    # the gauge step (prox_gauge) keeps ALS from crawling along the gauge, flat for L but not for the prox term:
    # without it these modules took 63-138 sweeps and ended with relative gradients ~1e-5
    assert sweeps.shape == (3,) and 1 <= int(sweeps.max()) <= 10
    for i, name in enumerate(names):
        p, q = P[i].clone().requires_grad_(True), Q[i].clone().requires_grad_(True)
        TT = ideal_update(clients, W, name).pow(2).sum()
        total = dense_loss(clients, name, p, q) + 0.1 * TT * ((p - w).pow(2).sum() + (q - w).pow(2).sum())
        total.backward()
        assert p.grad.norm().item() / TT.item() < 1e-6 and q.grad.norm().item() / TT.item() < 1e-6
        assert (P[i] - w).norm() > 1e-3  # and it did move away from FedIT


# ---- defaults, options, errors ----------------------------------------------------------------------------
def test_the_defaults_are_the_evidence_sweeps_choice():
    """FLoRA-NA's default is ALS with the proximal term at λ = 10 (README, "Does FLoRA-NA help?"): the method, its
    configure() and the run config agree on it."""
    clients = clients5()
    for method, options in (("florana", dict(solver="als", prox=10.0, gauge="sum_p")),
                            ("svd", dict(split="client_norm"))):
        plain = aggregate_adapters(clients, method, weights=W)
        named = aggregate_adapters(clients, METHODS[method].configured(**options), weights=W)
        for name, m in plain.adapter.modules.items():
            assert torch.equal(m.A, named.adapter.modules[name].A) and torch.equal(m.B, named.adapter.modules[name].B)
    defaults = method_of(RunConfig(method="florana")).estimate.keywords
    assert defaults == dict(solver="als", steps=10, lr=1.0, prox=10.0, gauge="sum_p")
    assert method_of(RunConfig(method="svd")).estimate.keywords == dict(split="client_norm")


@pytest.mark.parametrize("method, options, message", [
    ("florana", {"solver": "newton"}, "florana solver must be one of als, gradient, got 'newton'"),
    ("florana", {"gauge": "sum_q"}, "florana gauge must be one of sum_p, balanced, client_norm, fedit_norm"),
    ("florana", {"lr": 2.0}, r"lr in \(0, 2\)"),
    ("florana", {"prox": -1.0}, "prox >= 0"),
    ("svd", {"split": "a"}, "svd split must be one of client_norm, balanced, b, got 'a'"),
    ("florana", {"tol": 1e-3}, "florana has no option tol; its options: solver, steps, lr, prox, gauge"),
])
def test_bad_options_are_refused(method, options, message):
    with pytest.raises(FloranaError, match=message):
        METHODS[method].configured(**options)


@pytest.mark.parametrize("data, message", [
    ({"florana_solver": "newton"}, "florana_solver must be one of als, gradient"),
    ({"florana_steps": 0}, "florana_steps must be >= 1"),
    ({"florana_lr": 2.5}, r"florana_lr must be in \(0, 2\)"),
    ({"florana_prox": -0.1}, "florana_prox must be >= 0"),
    ({"florana_gauge": "both"}, "florana_gauge must be one of sum_p, balanced, client_norm, fedit_norm"),
    ({"svd_split": "a"}, "svd_split must be one of client_norm, balanced, b"),
])
def test_bad_config_values(data, message):
    with pytest.raises(FloranaError, match=message):
        RunConfig(**data)


def test_run_config_keys_reach_the_method_and_compare_makes_variants():
    method = method_of(RunConfig(method="florana", florana_solver="gradient", florana_steps=3, florana_lr=0.5,
                                 florana_prox=0.2, florana_gauge="balanced"))
    assert method.estimate.keywords == dict(solver="gradient", steps=3, lr=0.5, prox=0.2, gauge="balanced")
    assert method_of(RunConfig(method="svd", svd_split="b")).estimate.keywords == dict(split="b")
    plan = dict(plan_runs(RunConfig(), ["fedit", "florana", "svd"], [0], [0.5],
                          {"florana_gauge": ["sum_p", "balanced"], "svd_split": ["client_norm", "b"]}))
    by_method = {}
    for cfg in plan.values():
        by_method.setdefault(cfg.method, set()).add((cfg.florana_gauge, cfg.svd_split))
    assert by_method == {"fedit": {("sum_p", "client_norm")},
                         "florana": {("sum_p", "client_norm"), ("balanced", "client_norm")},
                         "svd": {("sum_p", "client_norm"), ("sum_p", "b")}}
    # the default's values are the default's runs (an ablation reuses them): only the variants carry an option
    assert sorted(plan) == ["fedit-alpha0.5-seed0", "florana-alpha0.5-florana_gaugebalanced-seed0",
                            "florana-alpha0.5-seed0", "svd-alpha0.5-seed0", "svd-alpha0.5-svd_splitb-seed0"]


# ---- diagnostics ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["florana", "svd", "fedit"])
def test_diagnostics_are_the_factor_norms_and_florana_weights(method):
    clients = clients5(ranks=[2, 3, 3, 1, 3])
    result = aggregate_adapters(clients, method, weights=W)
    fedit = aggregate_adapters(clients, "fedit", weights=W).adapter
    d = result.report.diagnostics
    mods = result.adapter.modules
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert d["norm_A"] == pytest.approx(mean([m.A.double().norm().item() for m in mods.values()]), rel=1e-6)
    assert d["norm_B"] == pytest.approx(mean([m.B.double().norm().item() for m in mods.values()]), rel=1e-6)
    assert d["fedit_norm_A"] == pytest.approx(mean([m.A.double().norm().item() for m in fedit.modules.values()]),
                                              rel=1e-5)
    assert d["fedit_norm_B"] == pytest.approx(mean([m.B.double().norm().item() for m in fedit.modules.values()]),
                                              rel=1e-5)
    florana_keys = {k for k in d if k.startswith("florana_")}
    if method != "florana":
        assert not florana_keys
        return
    reps = result.report.modules.values()
    P = [p for r in reps for p in r["P"]]
    Q = [q for r in reps for q in r["Q"]]
    assert d["florana_p_min"] == min(P) and d["florana_p_max"] == max(P)
    assert d["florana_q_min"] == min(Q) and d["florana_q_max"] == max(Q)
    assert d["florana_p_sum"] == pytest.approx(1.0)
    assert d["florana_q_sum"] == pytest.approx(mean([sum(r["Q"]) for r in reps]))
    assert d["florana_pq_sum"] == pytest.approx(mean([sum(r["P"]) * sum(r["Q"]) for r in reps]))
    sweeps = [r["sweeps"] for r in reps]
    assert all(isinstance(s, int) and s >= 1 for s in sweeps)
    assert d["florana_sweeps_mean"] == pytest.approx(mean(sweeps)) and d["florana_sweeps_max"] == max(sweeps)
    # Σ P·Σ Q is gauge-free: the same under every gauge, while Σ Q alone moves with it
    balanced = aggregate_adapters(clients, FLORANA.configured(gauge="balanced"), weights=W).report.diagnostics
    assert balanced["florana_pq_sum"] == pytest.approx(d["florana_pq_sum"], rel=1e-9)
    assert balanced["florana_q_sum"] != pytest.approx(d["florana_q_sum"], rel=1e-3)
