"""Differential privacy: per-example clipping, noise scale, the accountant against Opacus's own, calibration, the
budget stop, client-level DP's refusals, and DP runs of the engine (metrics and resume) on tiny models."""

import json
import math

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from florana.errors import FloranaError
from florana.federation.engine import BudgetSpent, read_metrics, run
from florana.privacy import (calibrate_noise, clip_per_example, clip_update, dp_fedavg, epsilon, gaussian_noise,
                             poisson_batches, update_norm)
from florana.privacy.accountant import sample_level_plan
from florana.privacy.per_example import per_example_gradients
from florana.report.tables import run_numbers
from florana.train.local import example_losses
from florana.train.model import load_model
from tiny import sentiment_csv, tiny_bert, tiny_config, tiny_llama


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return {"bert": tiny_bert(root), "llama": tiny_llama(root), "csv": sentiment_csv(root)}


def lora_model(assets, task):
    targets = ["query", "value"] if task == "classification" else ["q_proj", "v_proj"]
    model, _ = load_model(task, str(assets["bert" if task == "classification" else "llama"]), 2,
                          {"r": 2, "lora_alpha": 4.0, "lora_dropout": 0.0, "use_rslora": False,
                           "target_modules": targets}, 0, device=torch.device("cpu"))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B = 0 at init would give A no gradient: make every factor's gradient non-trivial
            torch.nn.init.normal_(p, std=0.5)
    for m in model.modules():  # dropout off, so that an example alone meets the same network as in its batch
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model.train()  # Opacus records activations in training mode only
    return model


@pytest.mark.parametrize("task", ["classification", "causal_lm"])
def test_per_example_gradients_are_each_examples_own_and_clipping_bounds_them(assets, task):
    model = lora_model(assets, task)
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(0)
    ids = torch.randint(1000, 3000, (5, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = torch.tensor([0, 1, 1, 0, 1]) if task == "classification" else ids.masked_fill(mask == 0, -100)
    with per_example_gradients(model) as wrapped:
        example_losses(wrapped(input_ids=ids, attention_mask=mask).logits, labels).sum().backward()
        samples = [p.grad_sample.clone() for p in params]
    assert not any(hasattr(p, "grad_sample") for p in params)  # the hooks and their per-example state are gone
    for i in range(5):  # each example's gradient, computed alone, is its row of the per-example gradients
        for p in params:
            p.grad = None
        example_losses(model(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1]).logits, labels[i:i + 1]).sum() \
            .backward()
        for p, g in zip(params, samples):
            torch.testing.assert_close(g[i], p.grad, rtol=1e-4, atol=1e-6)
    norms = torch.cat([g.flatten(1) for g in samples], 1).norm(dim=1)
    clip = float(norms.median())  # some examples above the bound, some below
    summed, before = clip_per_example(samples, clip)
    torch.testing.assert_close(before, norms)
    factors = (clip / norms).clamp(max=1)
    clipped = [g * factors.view(-1, *[1] * (g.dim() - 1)) for g in samples]
    after = torch.cat([g.flatten(1) for g in clipped], 1).norm(dim=1)
    # an example below the bound is left as it is; the one at the median may be scaled by 1 - 1 ulp (torch divides a
    # scalar by a tensor through the reciprocal, whose rounding differs between CPUs' vector units)
    below = norms < clip
    assert below.sum() == 2 and (after <= clip * (1 + 1e-5)).all() and (after[below] == norms[below]).all()
    for s, c in zip(summed, clipped):
        torch.testing.assert_close(s, c.sum(0), rtol=1e-5, atol=1e-7)


def test_noise_has_the_configured_scale():
    shapes = [torch.zeros(200, 100), torch.zeros(3000)]
    drawn = torch.cat([z.flatten() for z in gaussian_noise(shapes, 0.7 * 2.0, torch.Generator().manual_seed(1))])
    std = drawn.std().item()  # 23000 draws: the sample std is within ~1% of the true one
    assert abs(std / 1.4 - 1) < 0.03 and abs(drawn.mean().item()) < 0.03
    assert not 0.8 * 1.4 * 0.97 < std < 0.8 * 1.4 * 1.03 and not 1.25 * 1.4 * 0.97 < std < 1.25 * 1.4 * 1.03


def test_accountant_matches_opacus_stepping_and_calibration_meets_the_target():
    accountant = RDPAccountant()
    for _ in range(300):  # Opacus's own bookkeeping, one step at a time
        accountant.step(noise_multiplier=1.1, sample_rate=0.02)
    assert epsilon(1.1, 0.02, 300, 1e-5) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    assert epsilon(1.1, 0.02, 0, 1e-5) == 0
    for target in (1.0, 3.0, 8.0):
        sigma = calibrate_noise(target, 0.05, 120, 1e-3)
        eps = epsilon(sigma, 0.05, 120, 1e-3)
        assert target * 0.98 <= eps <= target  # within it, and close to it
    plan = sample_level_plan(clip=1.0, noise=None, target=2.0, delta=None, batch_size=8, local_steps=3, rounds=5,
                             sizes={0: 40, 1: 100})
    assert plan.rates == {0: 0.2, 1: 0.08} and plan.deltas == {0: 1 / 40, 1: 1 / 100}
    assert max(plan.epsilon(u, 5) for u in plan.rates) <= 2.0  # every client within the target after every round
    assert plan.over_budget([0, 1], {0: 4, 1: 4}) is None and plan.over_budget([0], {0: 5})[0] == 0


def test_poisson_batches_sample_each_example_at_the_rate():
    batches = poisson_batches(50, 0.2, 2000, np.random.default_rng(0))
    sizes = np.array([len(b) for b in batches])
    assert abs(sizes.mean() - 10) < 0.3 and sizes.min() < sizes.max()  # sizes vary, as Poisson sampling makes them
    counts = np.bincount(np.concatenate(batches), minlength=50)
    assert abs(counts.mean() / 2000 - 0.2) < 0.01


def test_dp_fedavg_clips_each_update_and_adds_noise_to_the_sum():
    received = {"w": torch.zeros(4000)}
    big = {"w": torch.full((4000,), 1.0)}  # norm ~63, clipped to 2
    small = {"w": torch.full((4000,), 0.001)}  # norm ~0.06, kept
    assert update_norm(clip_update(big, 2.0)) == pytest.approx(2.0, rel=1e-6)
    quiet = dp_fedavg(received, [big, small], clip=2.0, noise=0.0, denominator=4, generator=torch.Generator())
    expected = (2.0 / math.sqrt(4000) + 0.001) / 4
    torch.testing.assert_close(quiet["w"], torch.full((4000,), expected))
    noisy = dp_fedavg(received, [], clip=2.0, noise=1.5, denominator=4, generator=torch.Generator().manual_seed(0))
    assert noisy["w"].std().item() == pytest.approx(1.5 * 2.0 / 4, rel=0.05)  # an empty round is noise too


def test_client_level_dp_refuses_what_it_cannot_protect(assets):
    from florana.aggregation import get_method

    for method in ("florana", "svd", "flexlora", "lora_fair", "hetlora", "flora", "fedex"):
        with pytest.raises(FloranaError, match=f"does not apply to {method}") as refused:  # with its own reason
            tiny_config(assets, dp="client", dp_noise=1.0, method=method, weighting="uniform")
        assert get_method(method).needs_each_client in str(refused.value)
    with pytest.raises(FloranaError, match="weighting"):
        tiny_config(assets, dp="client", dp_noise=1.0, method="fedit")
    with pytest.raises(FloranaError, match="dp_noise .* or dp_epsilon"):
        tiny_config(assets, dp="sample")
    with pytest.raises(FloranaError, match="centralized"):
        tiny_config(assets, dp="sample", dp_noise=1.0, method="centralized")
    for method in ("fedit", "ffa", "fedsa", "rolora", "fedsvd"):
        tiny_config(assets, dp="client", dp_noise=1.0, method=method, weighting="uniform")


def test_a_dp_run_records_each_clients_epsilon_and_resumes_with_its_accounting(assets, tmp_path):
    cfg = tiny_config(assets, dp="sample", dp_noise=1.0, dp_clip=0.5, method="ffa", rounds=3, sample_fraction=0.67)
    run(cfg, tmp_path / "whole")
    whole = read_metrics(tmp_path / "whole")
    taken = {u: 0 for u in range(3)}
    for m in whole:  # ε grows for the clients that took part, by the accountant's count of their steps
        for u in m["clients"]:
            taken[u] += 1
        assert m["dp_noise"] == {"0": 1.0, "1": 1.0, "2": 1.0} and set(m["dp_epsilon"]) == {"0", "1", "2"}
        for u, eps in m["dp_epsilon"].items():
            n = int(1 / m["dp_delta"][u])  # δ defaults to 1/N_u
            assert eps == pytest.approx(epsilon(1.0, min(1.0, 8 / n), 2 * taken[int(u)], 1 / n))
        assert m["dp_epsilon_max"] == max(m["dp_epsilon"].values())
    assert 0 < whole[-1]["dp_epsilon_max"] == run_numbers(whole)["dp_epsilon_max"]  # the report's column
    # stopped after round 1 and resumed: the same ε (the accounting came back from the checkpoint) and numbers
    run(cfg.with_overrides(rounds=1), tmp_path / "split")
    run(cfg, tmp_path / "split", resume=True)
    split = read_metrics(tmp_path / "split")
    for a, b in zip(whole, split):
        assert a["dp_epsilon"] == b["dp_epsilon"] and a["global_accuracy"] == b["global_accuracy"]
    torch.testing.assert_close(torch.tensor(whole[-1]["train_loss"]), torch.tensor(split[-1]["train_loss"]))


def test_a_checkpoint_with_one_noise_multiplier_for_all_clients_is_refused_on_resume(assets, tmp_path):
    """Checkpoints written before each client had its own σ hold one number: resuming one would account the rounds
    done with noise they did not have, so it stops and says why."""
    cfg = tiny_config(assets, dp="sample", dp_noise=1.0, rounds=2)
    run(cfg.with_overrides(rounds=1), tmp_path / "run")
    state = tmp_path / "run" / "checkpoints" / "round-0001" / "state.json"
    meta = json.loads(state.read_text())
    assert meta["privacy"]["noise"] == {"0": 1.0, "1": 1.0, "2": 1.0}
    meta["privacy"]["noise"] = 1.0  # as the older version wrote it
    state.write_text(json.dumps(meta))
    with pytest.raises(FloranaError, match="one for every client.*start the run afresh"):
        run(cfg, tmp_path / "run", resume=True)


def test_a_target_epsilon_stops_the_run_before_it_would_be_exceeded(assets, tmp_path):
    cfg = tiny_config(assets, dp="sample", dp_noise=1.0, rounds=6, bf16=True)  # bfloat16 autocast under DP too
    run(cfg.with_overrides(dp_epsilon=0.0, rounds=6), tmp_path / "free")
    free = read_metrics(tmp_path / "free")
    target = (free[2]["dp_epsilon_max"] + free[3]["dp_epsilon_max"]) / 2  # round 4 would pass it
    with pytest.raises(BudgetSpent, match="before round 4"):
        run(cfg.with_overrides(dp_epsilon=target), tmp_path / "capped")
    capped = read_metrics(tmp_path / "capped")
    assert len(capped) == 3 and capped[-1]["dp_epsilon_max"] <= target
    assert (tmp_path / "capped" / "global_adapter").is_dir()  # the rounds done are closed and kept


def test_calibrated_noise_ends_the_planned_rounds_within_the_target_at_every_client(assets, tmp_path):
    """Each client's σ is calibrated to its own sample rate and δ, so each ends at the target, not only the one with
    the fewest examples (one σ for all would leave the others far below their budget under far more noise)."""
    run(tiny_config(assets, dp="sample", dp_epsilon=4.0, rounds=2, partition="dirichlet", alpha=0.3),
        tmp_path / "run")
    last = read_metrics(tmp_path / "run")[-1]
    sizes = {str(p["client"]): p["size"] for p in json.loads((tmp_path / "run" / "partition.json").read_text())}
    assert len(set(sizes.values())) == 3  # clients of different sizes: different sample rates
    assert all(3.8 <= e <= 4.0 for e in last["dp_epsilon"].values()) and len(last["dp_epsilon"]) == 3
    smallest, largest = min(sizes, key=sizes.get), max(sizes, key=sizes.get)
    assert last["dp_noise"][smallest] > last["dp_noise"][largest]  # a higher sample rate needs more noise


@pytest.mark.parametrize("method", ["fedit", "rolora"])
def test_client_level_dp_run_moves_the_global_by_the_noisy_clipped_mean(assets, tmp_path, method):
    cfg = tiny_config(assets, dp="client", dp_noise=0.5, dp_clip=0.05, method=method, weighting="uniform", rounds=2)
    run(cfg, tmp_path / "run")
    metrics = read_metrics(tmp_path / "run")
    assert metrics[0]["dp_epsilon_max"] < metrics[1]["dp_epsilon_max"]
    assert metrics[1]["dp_epsilon"]["0"] == pytest.approx(epsilon(0.5, 1.0, 2, 1 / 3))


def test_causal_lm_trains_under_dp_sgd(assets, tmp_path):
    from tiny import arithmetic_jsonl
    data = arithmetic_jsonl(tmp_path)
    run(tiny_config(assets, task="causal_lm", model=str(assets["llama"]), dataset=str(data), test_size=10,
                    target_modules=["q_proj", "v_proj"], dp="sample", dp_noise=1.0, rounds=1, method="fedit",
                    max_new_tokens=2, text_column="question", label_column="answer"), tmp_path / "run")
    m = read_metrics(tmp_path / "run")[-1]
    assert math.isfinite(m["train_loss"]) and m["dp_epsilon_max"] > 0


def test_deployed_dp_draws_its_noise_from_os_entropy_not_the_run_seed(assets):
    """The Flower server sends every node the run's seed: noise drawn from it could be redrawn and subtracted, so a
    deployed node (and server) draws DP's batches and noise from OS entropy; a simulation keeps the seed."""
    from florana.federation.engine import Federation
    from florana.privacy import dp_seed

    assert dp_seed(7, secret=False) == 7 and len({dp_seed(7, secret=True) for _ in range(3)}) == 3
    cfg = tiny_config(assets, dp="sample", dp_noise=1.0, dp_clip=0.5, rounds=1)
    uploads = {}
    for secret in (False, False, True, True):
        fed = Federation(cfg, secret_dp=secret)
        loss, tensors = fed.train_client(fed.initial, fed.data.clients[0].train, 2, 123, dp_client=0)
        uploads.setdefault(secret, []).append(tensors)
    seeded, secret = uploads[False], uploads[True]
    assert all(torch.equal(seeded[0][k], seeded[1][k]) for k in seeded[0])  # the simulation repeats exactly
    assert any(not torch.equal(secret[0][k], secret[1][k]) for k in secret[0])  # the deployment does not


def test_client_level_dp_on_a_server_whose_nodes_hold_the_data(assets):
    """A Flower server with node-local data holds no client's examples, only the counts they report (Client.size):
    DP-FedAvg's denominator and the ε it records count those clients, as sampling does, not an empty train set."""
    from dataclasses import replace

    from florana.federation.engine import Federation
    from florana.train.tasks import Encoded

    fed = Federation(tiny_config(assets, dp="client", dp_noise=1.0, method="fedit", weighting="uniform",
                                 sample_fraction=1.0))
    fed.data.clients[:] = [replace(c, train=Encoded([], [])) for c in fed.data.clients]  # as on such a server
    noisy = fed.private_sum({}, 1)  # nobody's update arrived: the noise alone, over m = 1.0 × 3 clients
    assert all(torch.isfinite(t).all() for t in noisy.state_dict().values())
    metrics = {"round": 1, "clients": []}
    fed.charge_privacy(metrics)
    assert set(metrics["dp_epsilon"]) == {"0", "1", "2"}


def test_the_run_says_how_much_of_a_dp_step_is_noise(assets, caplog):
    """σ·√d / (expected batch): the noise norm on a step's mean gradient against the clip bound, for the values the
    method trains (ffa freezes A, so fewer values and less noise norm than fedit at the same σ)."""
    import logging
    import re

    from florana.federation.engine import Federation

    plan = sample_level_plan(clip=0.5, noise=2.0, target=None, delta=None, batch_size=16, local_steps=1, rounds=1,
                             sizes={0: 100, 1: 8})
    assert plan.noise_to_clip(0, 100, 10_000) == pytest.approx(2.0 * 100 / 16)  # q·N = 16
    assert plan.noise_to_clip(1, 8, 10_000) == pytest.approx(2.0 * 100 / 8)  # q = 1: the whole client
    caplog.set_level(logging.INFO, logger="florana")
    said = {}
    for method in ("fedit", "ffa"):
        caplog.clear()
        fed = Federation(tiny_config(assets, dp="sample", dp_noise=1.0, method=method))
        found = re.search(r"norm ≈ (\S+)\.\.(\S+) × dp_clip, against at most 1 × dp_clip of clipped gradient \((\d+) "
                          r"trained values", caplog.text)
        assert found, caplog.text
        low, high, trained = float(found[1]), float(found[2]), int(found[3])
        sizes = [c.size for c in fed.data.clients]
        expected = sorted(1.0 * trained ** 0.5 / min(8, n) for n in sizes)  # batch_size 8
        assert (low, high) == (pytest.approx(expected[0], rel=0.05), pytest.approx(expected[-1], rel=0.05))
        assert all(p.requires_grad for p in fed.slots.params.values())  # counting trained nothing
        said[method] = trained
    lora_A = sum(t.numel() for k, t in fed.initial.items() if ".lora_A." in k)
    assert said["fedit"] - said["ffa"] == lora_A > 0


def test_a_run_without_dp_never_imports_opacus():
    """Opacus takes seconds to import (its optimizers pull in torch.distributed and scipy), which every Flower
    message process would pay: the engine, the CLI and the Flower apps import it only when a run accounts ε."""
    import subprocess
    import sys

    code = ("import sys, florana.cli, florana.federation.engine, florana.flower.client, florana.flower.server; "
            "sys.exit('opacus' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
