"""rolora, lora_fair, fedsvd and error feedback against dense references: what each round trains and sends, the
factors each server rule produces, and the residual error feedback carries from round to round."""

import math

import pytest
import torch

from factories import applied_update, ideal_update, make_clients
from florana.aggregation import METHODS, aggregate_adapters
from florana.errors import FloranaError
from florana.lora import LoraAdapter, LoraModule

W = [0.1, 0.2, 0.3, 0.4]


def with_factor(clients, factor, source=0):
    """The clients with `factor` ('A' or 'B') replaced by client `source`'s, as after a round that froze it."""
    out = []
    for a in clients:
        mods = {n: LoraModule(A=clients[source].modules[n].A if factor == "A" else m.A,
                              B=clients[source].modules[n].B if factor == "B" else m.B) for n, m in a.modules.items()}
        out.append(LoraAdapter(a.config, mods, a.extra))
    return out


def dense_products(result, clients, w):
    return {n: (ideal_update(clients, w, n), applied_update(result, n)) for n in clients[0].modules}


# ---- the Method extensions ---------------------------------------------------------------------------
def test_round_views_say_what_trains_and_travels():
    rolora, fedsvd, ffa, fedit = (METHODS[m] for m in ("rolora", "fedsvd", "ffa", "fedit"))
    assert rolora.varies and fedsvd.varies and not ffa.varies and not fedit.varies
    for t in (1, 3, 5):  # odd rounds: B trains and goes up; the frozen A comes down
        m = rolora.at_round(t)
        assert (m.trains_A, m.trains_B) == (False, True)
        assert [m.sends(f, up=True) for f in "AB"] == [False, True]
        assert [m.sends(f, up=False) for f in "AB"] == [True, False]
    for t in (2, 4):
        m = rolora.at_round(t)
        assert (m.trains_A, m.trains_B) == (True, False)
        assert [m.sends(f, up=True) for f in "AB"] == [True, False]
        assert [m.sends(f, up=False) for f in "AB"] == [False, True]
    # unspecialised, a method says what some round trains or sends: both factors may travel either way for rolora
    assert all(rolora.sends(f, up=up) for f in "AB" for up in (True, False))
    period3 = fedsvd.configured(period=3)
    for t in range(1, 8):
        m = period3.at_round(t)
        assert (m.trains_A, m.trains_B) == (False, True) and not m.sends("A", up=True)
        assert m.sends("A", up=False) == (t > 1 and (t - 1) % 3 == 0), t  # after rounds 3, 6
        assert m.sends("B", up=False)
    assert fedsvd.sends("A", up=False) and not fedsvd.sends("A", up=True)
    assert ffa.at_round(7) is ffa
    with pytest.raises(FloranaError, match="fedit takes no options, got period"):
        fedit.configured(period=2)
    assert [n for n, m in METHODS.items() if m.feeds_back] == ["fedit", "florana", "svd", "hetlora", "flexlora",
                                                               "lora_fair"]


# ---- rolora -------------------------------------------------------------------------------------------
def test_rolora_rounds_are_exact_and_move_one_factor():
    clients = make_clients(kind="shared", seed=21, extra=True)  # round 1: every client holds the initial A
    one = aggregate_adapters(clients, "rolora", weights=W, round_=1)
    ffa = aggregate_adapters(clients, "ffa", weights=W)
    for name, m in one.adapter.modules.items():
        assert torch.equal(m.A, clients[0].modules[name].A)  # the frozen factor, bit for bit
        assert torch.equal(m.B, ffa.adapter.modules[name].B)
    # round 2: B is the round-1 average everyone holds, A trains
    drifted = make_clients(kind="random", seed=22, extra=True)
    two_in = with_factor(drifted, "B")
    two = aggregate_adapters(two_in, "rolora", weights=W, round_=2)
    assert two.report.relative_error < 1e-6
    for name, (T, got) in dense_products(two, two_in, W).items():
        torch.testing.assert_close(got, T, atol=1e-5, rtol=1e-5)
        assert torch.equal(two.adapter.modules[name].B, two_in[0].modules[name].B)
        expect_A = sum(w * a.modules[name].A.double() for w, a in zip(W, two_in))
        torch.testing.assert_close(two.adapter.modules[name].A.double(), expect_A, atol=1e-6, rtol=1e-6)
    d_k = [m.shape for m in clients[0].modules.values()]
    head = 2 * 10
    assert one.report.values_up_per_client == [sum(3 * d for d, k in d_k) + head] * 4
    assert two.report.values_up_per_client == [sum(3 * k for d, k in d_k) + head] * 4
    assert two.report.values_down_per_client == [sum(3 * k for d, k in d_k) + head] * 4
    with pytest.raises(FloranaError, match="client1: module .*lora_B differs from client0's; rolora needs every "
                                           "client to keep the shared frozen B"):
        aggregate_adapters(drifted, "rolora", round_=2)


def test_rolora_folds_different_scalings_into_the_trained_factor():
    clients = with_factor(make_clients(kind="random", seed=23), "B")
    clients[1] = LoraAdapter({**clients[1].config, "lora_alpha": 12}, clients[1].modules)  # s = 4 instead of 2
    result = aggregate_adapters(clients, "rolora", weights=W, round_=4)
    assert result.report.relative_error < 1e-6


# ---- fedsvd -------------------------------------------------------------------------------------------
def test_fedsvd_refactors_the_product_into_orthonormal_A():
    clients = make_clients(kind="shared", seed=24)
    result = aggregate_adapters(clients, "fedsvd", weights=W)  # round 1, period 1: a re-factoring round
    assert result.report.relative_error < 1e-6
    for name, (T, got) in dense_products(result, clients, W).items():
        torch.testing.assert_close(got, T, atol=1e-5, rtol=1e-5)
        m = result.adapter.modules[name]
        torch.testing.assert_close(m.A.double() @ m.A.double().T, torch.eye(3, dtype=torch.float64), atol=1e-5,
                                   rtol=0)
        # B = U_r Σ_r of the dense SVD of B̄A (columns up to sign), as seed fed-svd's reinit_lora computes it
        U, S, Vh = torch.linalg.svd(T / clients[0].scaling(name))
        torch.testing.assert_close(m.B.double().abs(), (U[:, :3] * S[:3]).abs(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(m.A.double().abs(), Vh[:3].abs(), atol=1e-5, rtol=1e-4)


def test_fedsvd_between_refactorings_is_ffa():
    clients = make_clients(kind="shared", seed=25)
    method = METHODS["fedsvd"].configured(period=3)
    ffa = aggregate_adapters(clients, "ffa", weights=W)
    for t in (1, 2, 4):
        plain = aggregate_adapters(clients, method, weights=W, round_=t)
        assert all(torch.equal(plain.adapter.modules[n].A, ffa.adapter.modules[n].A) and
                   torch.equal(plain.adapter.modules[n].B, ffa.adapter.modules[n].B) for n in clients[0].modules)
        assert plain.report.values_down_per_client == ffa.report.values_down_per_client
    refactored = aggregate_adapters(clients, method, weights=W, round_=3)
    assert refactored.report.relative_error < 1e-6
    assert not torch.equal(refactored.adapter.modules[next(iter(clients[0].modules))].A,
                           ffa.adapter.modules[next(iter(clients[0].modules))].A)


def test_fedsvd_keeps_a_rank_deficient_product():
    clients = make_clients(kind="shared", seed=26)
    zero_B = [LoraAdapter(a.config, {n: LoraModule(A=m.A, B=torch.zeros_like(m.B)) for n, m in a.modules.items()})
              for a in clients]
    result = aggregate_adapters(zero_B, "fedsvd")  # every B still at its zero init
    for m in result.adapter.modules.values():
        assert bool((m.B == 0).all()) and torch.isfinite(m.A).all()
        torch.testing.assert_close(m.A @ m.A.T, torch.eye(3), atol=1e-5, rtol=0)


# ---- lora_fair ----------------------------------------------------------------------------------------
def dense_lora_fair(clients, w, name, lam, steps, lr):
    """The paper's refinement done densely: SGD on ΔB (d×r, from zero) of 1 − cos((B̄+ΔB)Ā, ΔW*) + λ‖ΔB‖²."""
    s = clients[0].scaling(name)
    B_bar = sum(wu * a.modules[name].B.double() for wu, a in zip(w, clients))
    A_bar = sum(wu * a.modules[name].A.double() for wu, a in zip(w, clients))
    T = ideal_update(clients, w, name)
    delta = torch.zeros_like(B_bar, requires_grad=True)
    for _ in range(steps):
        P = (B_bar + delta) @ A_bar
        loss = 1 - (P * T).sum() / (P.norm() * T.norm()) + lam * delta.pow(2).sum()
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta - lr * grad).detach().requires_grad_(True)
    return s * (B_bar + delta.detach()) @ A_bar


@pytest.mark.parametrize("lam", [0.01, 1.0])
def test_lora_fair_equals_the_dense_refinement(lam):
    clients = make_clients(kind="lora", seed=27)
    method = METHODS["lora_fair"].configured(lam=lam, steps=40, lr=0.05)
    result = aggregate_adapters(clients, method, weights=W)
    fedit = aggregate_adapters(clients, "fedit", weights=W)
    for name in clients[0].modules:
        expect = dense_lora_fair(clients, W, name, lam, 40, 0.05)
        torch.testing.assert_close(applied_update(result, name), expect, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(result.adapter.modules[name].A, fedit.adapter.modules[name].A)  # Ā stays
        report = result.report.modules[name]
        assert report["cosine"] > report["cosine_fedit"]  # the steps raise the cosine


def test_lora_fair_least_squares_refit_is_the_dense_optimum():
    clients = make_clients(kind="lora", seed=28)
    result = aggregate_adapters(clients, METHODS["lora_fair"].configured(refit="least_squares"), weights=W)
    fedit = aggregate_adapters(clients, "fedit", weights=W)
    for name in clients[0].modules:
        s = clients[0].scaling(name)
        A_bar = fedit.adapter.modules[name].A.double()
        T = ideal_update(clients, W, name)
        B_ls = torch.linalg.lstsq(A_bar.T, T.T / s).solution.T  # argmin ‖s·B·Ā − T‖
        torch.testing.assert_close(result.adapter.modules[name].B.double(), B_ls, atol=1e-5, rtol=1e-4)
    assert result.report.relative_error < fedit.report.relative_error


def test_lora_fair_without_steps_is_fedit_and_refuses_an_unknown_refit():
    clients = make_clients(kind="lora", seed=29)
    zero = aggregate_adapters(clients, METHODS["lora_fair"].configured(steps=0), weights=W)
    fedit = aggregate_adapters(clients, "fedit", weights=W)
    for name in clients[0].modules:
        torch.testing.assert_close(zero.adapter.modules[name].B, fedit.adapter.modules[name].B)
    with pytest.raises(FloranaError, match="refit must be one of cosine, least_squares, got 'newton'"):
        METHODS["lora_fair"].configured(refit="newton")


# ---- error feedback -----------------------------------------------------------------------------------
def dense_best_rank(M, r):
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r], S[r:].pow(2).sum()


@pytest.mark.parametrize("method, ranks", [(m, None) for m in ("fedit", "florana", "svd", "lora_fair", "hetlora",
                                                                  "flexlora")]
                         + [(m, [2, 4, 3, 4]) for m in ("fedit", "florana", "svd", "hetlora", "flexlora")])
def test_error_feedback_against_a_dense_reference(method, ranks):
    """Three rounds of fresh clients: round 1 applies the method's own answer; later rounds apply the best rank r of
    (the method's answer + the residual); the residual is the best rank r of (ΔW* + residual − applied), as its
    report says; and Σ ΔW* − Σ applied = R_T + what the truncations dropped. With mixed ranks r is the global
    rank (the largest client rank), and the residual follows the global adapter."""
    r = max(ranks or [3])
    names = list(make_clients(seed=0)[0].modules)
    residual = {n: torch.zeros(12 if n != "base_model.model.mlp.up" else 16, 10, dtype=torch.float64) for n in names}
    dropped = {n: torch.zeros_like(residual[n]) for n in names}
    total_ideal = {n: torch.zeros_like(residual[n]) for n in names}
    total_applied = {n: torch.zeros_like(residual[n]) for n in names}
    state = {}
    for t in range(1, 4):
        clients = make_clients(kind="lora", ranks=ranks, seed=30 + t)
        plain = aggregate_adapters(clients, method, weights=W, round_=t)
        result = aggregate_adapters(clients, method, weights=W, round_=t, feedback=state)
        kept_sq = drop_sq = target_sq = 0.0
        for n in names:
            T = ideal_update(clients, W, n)
            answer = applied_update(plain, n)
            got = applied_update(result, n)
            if t == 1:
                assert torch.equal(result.adapter.modules[n].B, plain.adapter.modules[n].B)
                assert torch.equal(result.adapter.modules[n].A, plain.adapter.modules[n].A)
            else:
                expect, _ = dense_best_rank(answer + residual[n], r)
                torch.testing.assert_close(got, expect, atol=1e-4, rtol=1e-4)
                # the gauge: Ã keeps the norm the method gave Â
                assert result.adapter.modules[n].A.norm().item() == pytest.approx(
                    plain.adapter.modules[n].A.norm().item(), rel=1e-5)
            new, lost = dense_best_rank(T + residual[n] - got, r)
            R = result.feedback[n]
            torch.testing.assert_close(R.B.double() @ R.A.double(), new, atol=1e-4, rtol=1e-4)
            dropped[n] += T + residual[n] - got - new
            total_ideal[n] += T
            total_applied[n] += got
            residual[n] = R.B.double() @ R.A.double()
            kept_sq += new.pow(2).sum().item()
            drop_sq += lost.item()
            target_sq += T.pow(2).sum().item()
        rep = result.report
        assert rep.feedback_norm == pytest.approx(math.sqrt(kept_sq), rel=1e-4)
        assert rep.feedback_relative == pytest.approx(math.sqrt(kept_sq / target_sq), rel=1e-4)
        assert rep.feedback_dropped == pytest.approx(math.sqrt(drop_sq / target_sq), rel=1e-3, abs=1e-9)
        state = result.feedback
    for n in names:
        torch.testing.assert_close(total_ideal[n] - total_applied[n], residual[n] + dropped[n], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["fedit", "svd"])
def test_error_feedback_keeps_the_sum_of_updates_closer(method):
    """The same clients round after round: without feedback the applied sum falls behind the ideal one by the
    round's error every round; with it the residual stays bounded and only what its rank-r truncation drops is lost
    (measured here: after 8 rounds fedit's gap 0.64 against 1.33, svd's 0.53 against 0.92, in units of ‖ΔW*‖)."""
    clients = make_clients(kind="lora", seed=40)
    name = next(iter(clients[0].modules))
    T = ideal_update(clients, W, name)
    state, total_plain, total_fed = {}, 0, 0
    for t in range(1, 9):
        plain = aggregate_adapters(clients, method, weights=W, round_=t)
        fed = aggregate_adapters(clients, method, weights=W, round_=t, feedback=state)
        assert fed.report.feedback_relative < 1.0
        state = fed.feedback
        total_plain = total_plain + applied_update(plain, name)
        total_fed = total_fed + applied_update(fed, name)
    gap_plain = ((8 * T - total_plain).norm() / T.norm()).item()
    gap_fed = ((8 * T - total_fed).norm() / T.norm()).item()
    assert gap_plain == pytest.approx(8 * plain.report.modules[name]["relative_error"], rel=1e-4)
    assert gap_fed < 0.7 * gap_plain, (gap_fed, gap_plain)


@pytest.mark.parametrize("method, why", [("ffa", "is exact"), ("rolora", "is exact"), ("flora", "is exact"),
                                         ("fedsa", "never sends B")])
def test_error_feedback_is_refused_where_it_makes_no_sense(method, why):
    clients = make_clients(kind="shared", seed=41)
    with pytest.raises(FloranaError, match=f"error feedback needs an inexact method .*{method} {why}"):
        aggregate_adapters(clients, method, feedback={})


def test_error_feedback_of_exact_clients_is_zero():
    one = make_clients(num=1, kind="random", seed=42)[0]
    result = aggregate_adapters([one] * 3, "fedit", feedback={})
    assert result.report.feedback_relative < 1e-6
    again = aggregate_adapters([one] * 3, "fedit", feedback=result.feedback, round_=2)
    for name, m in one.modules.items():
        torch.testing.assert_close(applied_update(again, name), one.scaling(name) * (m.B.double() @ m.A.double()),
                                   atol=1e-4, rtol=1e-4)
