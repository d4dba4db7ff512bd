"""Secure aggregation (Flower's SecAgg+): which methods it serves, and that a run under it gives the plain run's
global adapter to within the quantisation bound, while the server only ever holds the clients' sum."""

import re
import time
from pathlib import Path

import pytest
import test_flower
import torch
from factories import make_clients
from safetensors.torch import load_file
from test_flower import ROOT, LocalGrid, assert_no_leftovers

from florana.aggregation import METHODS, aggregate_adapters
from florana.config import RunConfig
from florana.errors import FloranaError
from florana.federation.engine import read_metrics, run
from florana.flower.deploy import Loopback
from florana.lora import LoraAdapter, LoraModule
from florana.lora.adapter import padded_to_rank
from florana.privacy import epsilon

tiny = test_flower.tiny  # the Flower tests' tiny model and data (a fixture)


def mean_client(clients: list[LoraAdapter], weights: list[float], frozen_A: bool) -> LoraAdapter:
    """One client holding the weighted mean of what the clients add to a secure sum: their factors at the global
    rank (padded_to_rank, as a node pads them), each B carried to the global scaling. A frozen, shared A is not
    summed: the server holds it (a client of the largest rank has all of it)."""
    rank = max(c.config["r"] for c in clients)
    ref = next(c for c in clients if c.config["r"] == rank)
    total = sum(weights)
    summed: dict[str, torch.Tensor] = {}
    for c, w in zip(clients, weights):
        name = next(iter(c.modules))
        tensors = padded_to_rank(c.state_dict(), rank, c.scaling(name) / ref.scaling(name))
        for k, t in tensors.items():
            summed[k] = summed.get(k, 0) + (w / total) * t.double()
    modules = {n: LoraModule(A=ref.modules[n].A if frozen_A else summed[n + ".lora_A.weight"].float(), B=summed[n + ".lora_B.weight"].float())
               for n in ref.modules}
    extra = {k: summed[k].float() for k in ref.extra}
    return LoraAdapter(config=ref.config, modules=modules, extra=extra)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_sum_shaped_is_true_exactly_where_the_weighted_mean_is_all_the_server_needs(name):
    """The registry's `sum_shaped` is checked against the maths: a sum-shaped method's global adapter from the
    clients equals its global adapter from one client holding their weighted mean (which is all SecAgg+ shows the
    server); for every other method the two differ."""
    method = METHODS[name]
    shared_A = not method.trains_A or name == "rolora"  # ffa, fedsvd, rolora (round 1 trains B): one frozen A
    ranks = [2, 4, 2] if method.mixed_ranks else None
    clients = make_clients(3, 4, kind="shared" if shared_A else "lora", ranks=ranks, extra=True, seed=1)
    weights = [3.0, 1.0, 2.0]

    def outcome(result):  # the global adapter and any change of the base weights (fedex's residual)
        return {**result.adapter.state_dict(), **{f"base::{k}": v for k, v in result.base_update.items()}}
    direct = outcome(aggregate_adapters(clients, method, weights))
    via_mean = outcome(aggregate_adapters([mean_client(clients, weights, shared_A)], method))
    same = direct.keys() == via_mean.keys() and all(
        direct[k].shape == via_mean[k].shape and torch.allclose(direct[k], via_mean[k], atol=1e-5, rtol=1e-5)
        for k in direct)
    assert same == method.sum_shaped, (name, method.needs_each_client)
    assert bool(method.needs_each_client) != method.sum_shaped


# ---- through the real strategy and ClientApp -----------------------------------------------------------
class Watching(LocalGrid):
    """LocalGrid keeping every reply the server receives."""

    def __init__(self, num_nodes: int):
        super().__init__(num_nodes)
        self.replies = []

    def send_and_receive(self, messages, timeout=None):
        replies = super().send_and_receive(messages, timeout)
        self.replies += replies
        return replies


def checkpoints(run_dir: Path) -> list[dict[str, torch.Tensor]]:
    """The global tensors after each round (every checkpoint kept)."""
    return [load_file(d / "state.safetensors") for d in sorted((run_dir / "checkpoints").glob("round-*"))]


@pytest.mark.parametrize("method, weighting, ranks, rounds", [("fedit", "examples", [2, 4], 1),
                                                             ("rolora", "uniform", [], 2)])
def test_a_run_under_secagg_gives_the_plain_runs_global_adapter(tiny, tmp_path, monkeypatch, method, weighting,
                                                                ranks, rounds):
    """SecAgg+ through the real strategy, Flower's mods and workflow stages and the ClientApp (nodes of ranks 2, 4,
    2 for fedit; rolora's B round then its A round): every round's global tensors equal the plain run's to within
    the quantisation bound (secagg.py): stochastic rounding moves each value by less than 2c/T, so the weighted
    mean by less than U·2c/T (example weights; 2c/T uniform), plus float32 rounding. Round 2 trains from round 1's
    slightly different global, so it gets twice round 1's bound (measured: a few 1e-6). The server never holds a
    client's factors: no reply carries an array, and the aggregator gets one adapter a round, the secure mean."""
    from florana.federation.engine import Federation
    from florana.flower.server import serve

    cfg = RunConfig(**{**tiny, "num_clients": 3, "rounds": rounds, "client_ranks": ranks, "keep_checkpoints": 2},
                    method=method, weighting=weighting)
    serve(LocalGrid(3), cfg, tmp_path / "plain", node_wait=5)
    aggregated = []
    plain_aggregate = Federation.aggregate
    monkeypatch.setattr(Federation, "aggregate", lambda self, updates, labels, *a, **k: (
        aggregated.append(labels), plain_aggregate(self, updates, labels, *a, **k)))
    grid = Watching(3)
    serve(grid, cfg.with_overrides(secagg=True), tmp_path / "secure", node_wait=5)
    step = 2 * cfg.secagg_clip / cfg.secagg_quantization
    bound = step * (3 if weighting == "examples" else 1)
    pairs = list(zip(checkpoints(tmp_path / "plain"), checkpoints(tmp_path / "secure")))
    assert len(pairs) == rounds
    for r, (a, b) in enumerate(pairs, 1):
        assert a.keys() == b.keys()
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert 0 < worst <= r * bound + 1e-7, (r, worst, bound)
    assert aggregated == [["the secure sum"]] * rounds
    assert all(len(rec) == 0 for reply in grid.replies if not reply.has_error()
               for rec in reply.content.array_records.values())
    history = read_metrics(tmp_path / "secure")
    assert all(m["relative_error"] is None and m["flower_bytes_up"] == m["bytes_up"] > 0 for m in history)
    assert [m["local_accuracy"] for m in history] == [m["local_accuracy"] for m in read_metrics(tmp_path / "plain")]


# ---- on real processes --------------------------------------------------------------------------------
def test_secagg_and_dp_on_a_loopback_deployment(tiny, tmp_path):
    """A SuperLink and 3 SuperNodes on loopback (every message a fresh ClientApp process), three runs of fedit.
    SecAgg+ (one round, example weights; the in-process test above covers later rounds, which train from a slightly
    different global): the global tensors are within the quantisation bound of the plain run's (U·2c/T = 5.7e-6,
    plus 1e-7 for float32), no relative_error, and the masked upload booked: an int64 a value plus one for the
    weight, twice the plain float32 bytes plus 8 per node. The plain run is the in-process one, which a plain
    loopback run equals bit for bit (test_flower.py's deployment tests). DP-SGD (2 of 3 clients a round) with an ε
    budget that round 3 would exceed: rounds 1 and 2 run, every client's ε in metrics.jsonl is the accountant's for
    the rounds it took part in, and the run stops before round 3 keeping global_adapter/, as in process. DP-FedAvg
    (1 round) finishes with the federation's ε. The nodes' (DP-SGD) and the server's (DP-FedAvg) noise is not the
    run seed's."""
    cfg = RunConfig(**{**tiny, "num_clients": 3}, method="fedit", weighting="examples")
    sample = cfg.with_overrides(dp="sample", dp_noise=1.0, dp_clip=0.5, sample_fraction=0.67, rounds=3)
    inproc = {"plain": cfg, "sample": sample,  # in process: DP's noise from the run seed, no budget
              "client": cfg.with_overrides(dp="client", dp_noise=0.5, dp_clip=0.05, weighting="uniform", rounds=1)}
    for name, config in inproc.items():
        run(config, tmp_path / "inproc" / name)
    free = [m["dp_epsilon_max"] for m in read_metrics(tmp_path / "inproc" / "sample")]
    assert free[1] < free[2]  # round 3 takes a client past every ε of round 2: a budget between them stops it
    runs = {"secure": cfg.with_overrides(secagg=True, rounds=1), "sample": sample.with_overrides(dp_epsilon=sum(free[1:]) / 2),
            "client": inproc["client"]}
    seconds = {}
    with Loopback(tmp_path / "home", 3).start() as federation:
        for name, config in runs.items():
            t0 = time.monotonic()
            if name == "sample":
                with pytest.raises(FloranaError, match="stopped before round 3: it would take client"):
                    federation.run(ROOT, config, tmp_path / name, round_timeout=120)
            else:
                federation.run(ROOT, config, tmp_path / name, round_timeout=120)
            seconds[name] = time.monotonic() - t0
    print("seconds per run:", {k: round(v, 1) for k, v in seconds.items()})
    assert_no_leftovers("FLWR_HOME", str(tmp_path.resolve() / "home" / "flwr"))

    bound = 3 * 2 * cfg.secagg_clip / cfg.secagg_quantization  # U·2c/T, U = 3 nodes a round
    pairs = list(zip(checkpoints(tmp_path / "inproc" / "plain"), checkpoints(tmp_path / "secure")))
    assert len(pairs) == 1
    for r, (a, b) in enumerate(pairs, 1):
        assert a.keys() == b.keys()
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        print(f"round {r}: largest difference {worst:.2e}, bound {r * bound + 1e-7:.2e}")
        assert 0 < worst <= r * bound + 1e-7, (r, worst, bound)
    for plain, secure in zip(read_metrics(tmp_path / "inproc" / "plain"), read_metrics(tmp_path / "secure")):
        assert plain["relative_error"] is not None and secure["relative_error"] is None
        assert secure["flower_bytes_up"] == secure["bytes_up"] == 2 * plain["bytes_up"] + 8 * len(secure["clients"])
        if secure["round"] == 1:  # the nodes trained from the same global as the in-process clients
            assert secure["local_accuracy"] == plain["local_accuracy"]

    history = read_metrics(tmp_path / "sample")
    assert len(history) == 2 and (tmp_path / "sample" / "global_adapter" / "adapter_model.safetensors").is_file()
    assert min(len(m["clients"]) for m in history) < 3  # someone sat a round out
    taken = {u: 0 for u in range(3)}
    for m in history:
        for u in m["clients"]:
            taken[u] += 1
        assert set(m["dp_epsilon"]) == {"0", "1", "2"} and m["dp_noise"] == {"0": 1.0, "1": 1.0, "2": 1.0}
        for u, eps in m["dp_epsilon"].items():
            n = round(1 / m["dp_delta"][u])  # δ defaults to 1/N_u
            assert eps == pytest.approx(epsilon(1.0, min(1.0, cfg.batch_size / n), cfg.local_steps * taken[int(u)],
                                                1 / n))
        assert m["dp_epsilon_max"] == max(m["dp_epsilon"].values()) > 0
    assert history[0]["train_loss"] != read_metrics(tmp_path / "inproc" / "sample")[0]["train_loss"]  # nodes' noise

    (client,) = read_metrics(tmp_path / "client")
    assert client["dp_epsilon"] == {str(u): pytest.approx(epsilon(0.5, 1.0, 1, 1 / 3)) for u in range(3)}
    assert client["dp_epsilon_max"] == max(client["dp_epsilon"].values())
    (seeded,) = read_metrics(tmp_path / "inproc" / "client")
    assert client["local_accuracy"] == seeded["local_accuracy"]  # the nodes trained as in process, without noise;
    deployed, simulated = (load_file(d / "global_adapter" / "adapter_model.safetensors")  # the server's noise is
                           for d in (tmp_path / "client", tmp_path / "inproc" / "client"))  # its own
    assert deployed.keys() == simulated.keys() and not any(torch.equal(deployed[k], simulated[k]) for k in deployed)


# ---- refusals -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(m for m in METHODS if not METHODS[m].sum_shaped))
def test_a_method_that_needs_each_clients_factors_refuses_secagg_saying_why(name):
    with pytest.raises(FloranaError, match=f"secagg=true does not apply to {name}: .*sees only the sum.*"
                                           f"{re.escape(METHODS[name].needs_each_client)}.*fedit, ffa, fedsa"):
        RunConfig(method=name, secagg=True)


def test_secagg_refuses_what_it_cannot_serve(tmp_path):
    with pytest.raises(FloranaError, match="secagg=true needs an aggregator; local is a bound"):
        RunConfig(method="local", secagg=True)
    with pytest.raises(FloranaError, match="secagg=true and error_feedback=true exclude each other"):
        RunConfig(method="fedit", secagg=True, error_feedback=True)
    with pytest.raises(FloranaError, match="at least 2 clients"):
        RunConfig(method="fedit", secagg=True, num_clients=1)
    with pytest.raises(FloranaError, match=r"secagg_threshold must be in \(0.5, 1\]"):
        RunConfig(method="fedit", secagg=True, secagg_threshold=0.5)
    with pytest.raises(FloranaError, match="secagg_shares must be 0 or >= 3"):
        RunConfig(method="fedit", secagg=True, secagg_shares=2)
    with pytest.raises(FloranaError, match="secagg=true with dp='client' is not supported"):
        RunConfig(method="fedit", secagg=True, dp="client", dp_noise=1.0, weighting="uniform")
    with pytest.raises(FloranaError, match="secagg=true is for the Flower runtime .* would hide nothing"):
        run(RunConfig(method="fedit", secagg=True), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_a_value_outside_the_clipping_range_fails_the_node_naming_it(tiny, tmp_path):
    from florana.flower.server import serve

    cfg = RunConfig(**{**tiny, "rounds": 1}, method="fedit", secagg=True, secagg_clip=1e-4)
    with pytest.raises(FloranaError, match=r"SecAgg\+ stopped at its collect_masked_vectors stage.*outside "
                                           r"secagg_clip=0.0001.*raise secagg_clip"):
        serve(LocalGrid(2), cfg, tmp_path / "secure", node_wait=5)


# ---- the README's methods table -----------------------------------------------------------------------
def test_the_readmes_secure_aggregation_column_is_the_registrys():
    """README's aggregator table has a column 'works under secure aggregation': yes exactly for the sum-shaped
    methods, and otherwise the registry's reason."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    header = next(line for line in readme.splitlines() if line.startswith("| name | server computes"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    col = cells.index("works under secure aggregation")
    rows = {}
    for line in readme.splitlines():
        m = re.match(r"\| `(\w+)`", line)
        if m and m.group(1) in METHODS and len(line.strip("|").split("|")) == len(cells):
            rows[m.group(1)] = line.strip("|").split("|")[col].strip()
    assert rows.keys() == METHODS.keys()
    for name, cell in rows.items():
        method = METHODS[name]
        assert cell == ("yes" if method.sum_shaped else f"no: {method.needs_each_client}"), name
