"""Aggregate whole PEFT adapters: check the clients agree, batch modules of equal shape, run a method,
assemble the global adapter, and report error, error floor and what crossed the wire."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from florana.aggregation.base import Method, client_weights, weighted_mean_coefficients
from florana.aggregation.factors import ClientFactors
from florana.aggregation.feedback import feed_back
from florana.aggregation.linalg import factor_norms, real_dtype
from florana.aggregation.registry import METHODS, get_method
from florana.errors import FloranaError
from florana.lora.adapter import LoraAdapter, LoraModule, has_non_finite, with_ranks
from florana.lora.base_delta import ADD_FACTORS, apply_change, dense_change


# Modules of one shape are batched, as many at a time as keep each (modules, R, R) float64 matrix of the
# factor space under this many elements (4 MiB): a 7B model's 128 modules at U=10, r=16 go 20 at a time,
# a hundred clients' R = 800 one at a time.
BATCH_ELEMENTS = 1 << 19


@dataclass
class Report:
    """What one aggregation did: errors relative to ‖ΔW*‖_F (overall and per module) and the wire cost.

    fedit_error is FedIT's error on the very same client factors (zero-padded to the global rank where ranks
    differ), so any method can be read against the baseline and the floor without a second run. The error floor is
    Eckart–Young's at the global rank (the largest client rank, or the rank asked for). With error feedback: ‖R_t‖_F
    of the residual kept for the next round (feedback_norm), it and what its rank-r truncation dropped relative to
    ‖ΔW*‖_F (feedback_relative, feedback_dropped); None without. diagnostics: the means over modules of ‖Â‖_F and
    ‖B̂‖_F as output (norm_A, norm_B) and of FedIT's on the same clients (fedit_norm_A, fedit_norm_B, from the
    Grams), plus the method's own summary of its per-module diagnostics (Method.summarize: florana's P, Q, sweeps).
    """

    method: str
    weights: list[float]
    relative_error: float
    error_floor: float
    fedit_error: float | None = None
    feedback_norm: float | None = None
    feedback_relative: float | None = None
    feedback_dropped: float | None = None
    diagnostics: dict[str, float] = field(default_factory=dict)
    modules: dict[str, dict] = field(default_factory=dict)
    values_up_per_client: list[int] = field(default_factory=list)
    values_down_per_client: list[int] = field(default_factory=list)
    bytes_up_per_client: list[int] = field(default_factory=list)
    bytes_down_per_client: list[int] = field(default_factory=list)

    def to_json(self) -> dict:
        out = dict(self.__dict__)
        out["bytes_up_total"] = sum(self.bytes_up_per_client)
        out["bytes_down_total"] = sum(self.bytes_down_per_client)
        return out


@dataclass
class Aggregation:
    """The global adapter, the dense base-weight updates some methods need (fedex; keyed by module name, as d×k
    matrices like ΔW, float32 at least so that small updates survive), the report, and with error feedback the
    residual to carry into the next round (per module, R = B·A as a LoraModule). base_change: the same update in
    the form clients receive it (lora/base_delta.py keys: fedex's residual as factors where that is smaller than
    d×k), of which base_update is the product, computed by the code clients apply it with."""

    adapter: LoraAdapter
    base_update: dict[str, Tensor]
    report: Report
    feedback: dict[str, LoraModule] | None = None
    base_change: dict[str, Tensor] = field(default_factory=dict)


def check_clients(adapters: Sequence[LoraAdapter], labels: Sequence[str], method: Method) -> None:
    """Refuse clients that cannot be aggregated, naming the client and module at fault."""
    if not adapters:
        raise FloranaError("aggregation needs at least one client adapter")
    ref, ref_label = adapters[0], labels[0]
    for key in ("base_model_name_or_path", "fan_in_fan_out", "use_rslora"):
        for a, label in zip(adapters, labels):
            if a.config.get(key) != ref.config.get(key):
                raise FloranaError(f"{label}: {key}={a.config.get(key)!r} differs from {ref_label}'s "
                                   f"{ref.config.get(key)!r}")
    targets = _target_set(ref.config)
    widest: dict[str, tuple[LoraModule, str]] = {}  # per module, the first client of the largest rank
    for a, label in zip(adapters, labels):
        for name, m in a.modules.items():
            if name not in widest or m.rank > widest[name][0].rank:
                widest[name] = (m, label)
    for a, label in zip(adapters, labels):
        if _target_set(a.config) != targets:
            raise FloranaError(f"{label}: target_modules {a.config.get('target_modules')!r} differ from "
                               f"{ref_label}'s {ref.config.get('target_modules')!r}")
        for kind, mine, theirs in (("module", a.modules, ref.modules), ("tensor", a.extra, ref.extra)):
            missing, surplus = sorted(set(theirs) - set(mine)), sorted(set(mine) - set(theirs))
            if missing or surplus:
                what = f"lacks {kind} {missing[0]}" if missing else f"has {kind} {surplus[0]} that {ref_label} lacks"
                raise FloranaError(f"{label}: {what}")
        for name, m in a.modules.items():
            r0 = ref.modules[name]
            if m.shape != r0.shape or m.embedding != r0.embedding:
                raise FloranaError(f"{label}: module {name}: shape {m.shape} differs from {ref_label}'s {r0.shape}")
            if m.rank != r0.rank and not method.mixed_ranks:
                mixed = ", ".join(n for n, other in METHODS.items() if other.mixed_ranks)
                raise FloranaError(f"{label}: module {name}: rank {m.rank} differs from {ref_label}'s {r0.rank}; "
                                   f"{method.name} needs equal ranks ({mixed} accept mixed ranks)")
            for factor in ("A", "B"):  # a client of a smaller rank holds the first r rows of A, columns of B
                W, owner = widest[name]
                if method.trains(factor) or W.rank != m.rank and not method.mixed_ranks:
                    continue  # (a rank that differs where ranks must not is refused above, for one client or another)
                mine = getattr(m, factor).float()
                shared = W.A[: m.rank] if factor == "A" else W.B[:, : m.rank]
                if not torch.allclose(mine, shared.float(), rtol=1e-5, atol=1e-7):
                    raise FloranaError(f"{label}: module {name}: lora_{factor} differs from {owner}'s; {method.name} "
                                       f"needs every client to keep the shared frozen {factor}"
                                       + (" (its first r rows at rank r)" if factor == "A" else
                                          " (its first r columns at rank r)"))
        for key, t in a.extra.items():
            if t.shape != ref.extra[key].shape:
                raise FloranaError(f"{label}: tensor {key}: shape {tuple(t.shape)} differs from {ref_label}'s")
            if t.is_floating_point() and has_non_finite(t):
                raise FloranaError(f"{label}: tensor {key} holds NaN or Inf")


def _target_set(config: dict):
    t = config.get("target_modules")
    return frozenset(t) if isinstance(t, list) else t


def aggregate_adapters(adapters: Sequence[LoraAdapter], method: str | Method,
                       weights: Sequence[float] | Tensor | None = None,
                       labels: Sequence[str] | None = None, *, rank: int | None = None,
                       scaling: float | None = None, round_: int = 1,
                       feedback: dict[str, LoraModule] | None = None,
                       device: torch.device | str | None = None) -> Aggregation:
    """Aggregate client adapters with `method`; `labels` name the clients in errors (default client0, …).

    rank: the global adapter's rank for the methods that give every client one rank (all but flora's stack), at
    least the largest client rank (the default); a run passes its largest client rank, whichever clients a round
    sampled. scaling: the global adapter's LoRA scaling, the same for every module (default, per module: that of
    the first client of the largest rank; client 0's for flora, whose rank is the sum).
    round_: the round this aggregation closes, for methods whose protocol depends on it (rolora, fedsvd).
    feedback: with error feedback (feedback.py), the residual carried from the round before ({} at the first);
    the new one is returned in Aggregation.feedback. None: no error feedback. It is kept at the global rank, so
    with mixed ranks (hetlora, flexlora, fedit, svd, florana) it follows the global adapter, of which a client of
    rank r_u receives the first r_u components.
    device: where to compute (None: where the clients' factors are). The clients' factors may be anywhere (a run
    keeps them on the CPU); each batch of modules is copied to `device` as it is aggregated, so that device holds
    one batch at a time. The small matrices are float64 where the device has it (CPU, CUDA), else float32
    (linalg.real_dtype states the error bound). The returned adapter, base updates and residual are on `device`.
    """
    method = (get_method(method) if isinstance(method, str) else method).at_round(round_)
    if feedback is not None and not method.feeds_back:
        raise FloranaError(f"error feedback needs an inexact method whose server sees both factors; {method.name} "
                           + ("is exact: it loses nothing to feed back" if method.exact else
                              "never sends B to the server" if method.personal_B else "changes the base weights"))
    labels = list(labels) if labels is not None else [f"client{u}" for u in range(len(adapters))]
    check_clients(adapters, labels, method)
    ref = adapters[0]
    if device is None:
        first = next(iter(ref.modules.values()), None)
        device = first.B.device if first is not None else next(iter(ref.extra.values()), torch.empty(0)).device
    device = torch.device(device)
    real = real_dtype(device)
    w = client_weights(weights, len(adapters))  # float64 on the CPU, for the report
    w_dev = w.to(device, real)

    groups: dict[tuple, list[str]] = defaultdict(list)
    for name, m in ref.modules.items():
        ranks = tuple(a.modules[name].rank for a in adapters)
        scales = tuple(a.scaling(name) for a in adapters)
        groups[(m.shape, ranks, scales)].append(name)
    batches = [(key, names[i : i + step]) for key, names in groups.items()
               for step in [max(1, BATCH_ELEMENTS // sum(key[1]) ** 2)] for i in range(0, len(names), step)]

    out_modules: dict[str, LoraModule] = {}
    out_ranks: dict[str, int] = {}
    out_scales: dict[str, float] = {}
    base_update: dict[str, Tensor] = {}
    base_change: dict[str, Tensor] = {}
    module_reports: dict[str, dict] = {}
    err_sq = target_sq = floor_sq = fedit_sq = kept_sq = dropped_sq = 0.0
    norms = [0.0] * 4  # Σ over modules of ‖Â‖, ‖B̂‖ and FedIT's ‖Â‖, ‖B̂‖
    per_module_info: dict[str, list[Tensor]] = defaultdict(list)
    new_feedback: dict[str, LoraModule] | None = None if feedback is None else {}
    wire = _Ledger(len(adapters))

    for ((d, k), ranks, scales), names in batches:
        dtype = ref.modules[names[0]].B.dtype
        work = torch.float64 if dtype == torch.float64 and real == torch.float64 else torch.float32
        B_cat = _concatenate(adapters, names, "B", work, device)
        A_cat = _concatenate(adapters, names, "A", work, device)
        if has_non_finite(B_cat.sum()) or has_non_finite(A_cat.sum()):  # one cheap pass; name the culprit if any
            _require_finite(adapters, labels, names)
        if rank is not None and rank < max(ranks):
            raise FloranaError(f"the global rank {rank} is below a client's rank {max(ranks)} (module {names[0]})")
        clients = ClientFactors(B=B_cat, A=A_cat, ranks=ranks, scales=scales, weights=w_dev, global_rank=rank or 0,
                                real=real)
        scale = scaling if scaling is not None else _out_scaling(ranks, scales, method.out_rank(ranks))
        est = method.estimate(clients, scale)
        r_out = est.coef_B.shape[-1]
        B_hat = (clients.B @ est.coef_B.to(work)).to(dtype)
        A_hat = (est.coef_A.to(work) @ clients.A).to(dtype)
        carried = None
        if feedback is not None:
            carried = (torch.stack([feedback[n].B for n in names]).to(device),
                       torch.stack([feedback[n].A for n in names]).to(device)) \
                if all(n in feedback for n in names) else None
            B_hat, A_hat, (B_R, A_R), k_sq, d_sq = feed_back(clients, B_hat, A_hat, scale, carried, r_out)
            new_feedback.update({n: LoraModule(A=A_R[i], B=B_R[i]) for i, n in enumerate(names)})
            kept_sq += k_sq.sum().item()
            dropped_sq += d_sq.sum().item()
        # the error reported is that of the factors as output: bf16/fp16 rounding is measured on them (it can
        # undo an exact method); float32/64 rounding moves the coefficients' exact error by < 1e-6, and measuring
        # it would read every factor again in float64 (half the time of the whole call). Error feedback with a
        # residual replaces the method's factors, so their error is measured on the factors as output.
        lowrank_sq = clients.output_error_sq(B_hat, A_hat, scale) if dtype != work or carried is not None else \
            clients.error_sq(est.coef_B, est.coef_A, scale)
        t_sq = clients.target_norm_sq
        f_sq = clients.floor_sq(clients.out_rank)
        fedit_coef = weighted_mean_coefficients(clients, scale, clients.out_rank)
        fedit_sq += clients.error_sq(*fedit_coef, scale).sum().item()
        fedit_B, fedit_A = factor_norms(*fedit_coef, clients.gram_B, clients.gram_A)
        for i, t in enumerate((_norms(A_hat), _norms(B_hat), fedit_A, fedit_B)):
            norms[i] += t.sum().item()
        for key, value in est.info.items():
            if isinstance(value, Tensor):
                per_module_info[key].append(value)
        e_sq = lowrank_sq.clone()
        for i, name in enumerate(names):
            out_modules[name] = LoraModule(A=A_hat[i].contiguous(), B=B_hat[i].contiguous(),
                                           embedding=ref.modules[name].embedding)
            out_ranks[name], out_scales[name] = r_out, scale
            if method.residual:
                change, base_update[name], e_sq[i] = residual_change(name, clients, i, B_hat[i], A_hat[i], scale,
                                                                     work)
                base_change.update(change)
            module_reports[name] = {
                "relative_error": _relative(e_sq[i].item(), t_sq[i].item()),
                "error_floor": _relative(f_sq[i].item(), t_sq[i].item()),
            }
            if method.residual:
                module_reports[name]["lowrank_error"] = _relative(lowrank_sq[i].item(), t_sq[i].item())
            for key, value in est.info.items():
                if isinstance(value, Tensor):
                    module_reports[name][key] = value[i].tolist()
                else:
                    module_reports[name][key] = value
        err_sq += e_sq.sum().item()
        target_sq += t_sq.sum().item()
        floor_sq += f_sq.sum().item()
        for u, r in enumerate(ranks):
            cost = method.wire(r, r_out, d, k)
            wire.add(u, cost.up * len(names), adapters[u].modules[names[0]].B.element_size(),
                     cost.down * len(names), B_hat.element_size())
            if method.residual:  # every client downloads the residual in the form it was built in
                sent = [base_change[k] for k in base_change if k.rsplit(".", 1)[0] in names]
                wire.add(u, 0, 0, sum(t.numel() for t in sent), sent[0].element_size())

    extra: dict[str, Tensor] = {}
    for key, t in ref.extra.items():
        if t.is_floating_point():
            acc = sum(w[u].item() * a.extra[key].to(device, real) for u, a in enumerate(adapters))
            extra[key] = acc.to(t.dtype)
        else:
            extra[key] = t.to(device, copy=True)
        for u, a in enumerate(adapters):
            wire.add(u, t.numel(), a.extra[key].element_size(), t.numel(), t.element_size())

    norm_A, norm_B, fedit_norm_A, fedit_norm_B = (n / max(len(module_reports), 1) for n in norms)
    diagnostics = {"norm_A": norm_A, "norm_B": norm_B, "fedit_norm_A": fedit_norm_A, "fedit_norm_B": fedit_norm_B}
    if method.summarize is not None and per_module_info:
        diagnostics.update(method.summarize({k: torch.cat(v) for k, v in per_module_info.items()}))
    config = dict(ref.config)
    if any(out_ranks[n] != ref.modules[n].rank for n in out_ranks):
        config = with_ranks(ref.config, out_ranks, out_scales)
    report = Report(
        method=method.name,
        weights=w.tolist(),
        relative_error=_relative(err_sq, target_sq),
        error_floor=_relative(floor_sq, target_sq),
        fedit_error=_relative(fedit_sq, target_sq),
        feedback_norm=None if feedback is None else math.sqrt(kept_sq),
        feedback_relative=None if feedback is None else _relative(kept_sq, target_sq),
        feedback_dropped=None if feedback is None else _relative(dropped_sq, target_sq),
        diagnostics=diagnostics,
        modules=module_reports,
        values_up_per_client=wire.values_up, values_down_per_client=wire.values_down,
        bytes_up_per_client=wire.bytes_up, bytes_down_per_client=wire.bytes_down,
    )
    return Aggregation(LoraAdapter(config=config, modules=out_modules, extra=extra), base_update, report, new_feedback,
                       base_change)


def _out_scaling(ranks: tuple[int, ...], scales: tuple[float, ...], method_rank: int) -> float:
    """The global adapter's default scaling: that of the first client of the method's output rank (the largest),
    else (flora's sum) client 0's."""
    return scales[ranks.index(method_rank)] if method_rank in ranks else scales[0]


def residual_change(name: str, clients: ClientFactors, i: int, B_hat: Tensor, A_hat: Tensor, scale: float,
                    dtype: torch.dtype) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """FedEx's residual ΔW* − scale·B̂Â of module i (d×k), against the factors as output, as the change clients add
    to their base: ΔW* − scale·B̂Â = [X, −scale·B̂]·[Y; Â] (X, Y the clients' weighted stacked factors, §4) has rank
    at most R = Σr_u + r_out, so it travels as those factors (d×R, R×k) when R(d+k) < d·k values, else as the dense
    d×k product, computed in float64 (the real dtype of the device). Both kept in `dtype` (float32 at least).
    Returns (change, the dense update it applies (lora/base_delta.apply_change, as every client computes it), the
    error of what is kept, ‖ΔW* − scale·B̂Â − kept‖_F²)."""
    real = clients.real
    X = torch.cat([clients.B[i].to(real) * clients.column_weights, -scale * B_hat.to(real)], dim=1)
    Y = torch.cat([clients.A[i].to(real), A_hat.to(real)], dim=0)
    (d, R), k = X.shape, Y.shape[1]
    exact = X @ Y
    B, A = ADD_FACTORS
    change = {f"{name}.{B}": X.to(dtype).contiguous(), f"{name}.{A}": Y.to(dtype).contiguous()} \
        if R * (d + k) < d * k else dense_change({name: exact.to(dtype)})
    kept = apply_change({}, change)[name]
    return change, kept, (exact - kept.to(real)).pow(2).sum()


class _Ledger:
    """Values and bytes each client sends up and receives down in one aggregation."""

    def __init__(self, num_clients: int):
        self.values_up, self.values_down = [0] * num_clients, [0] * num_clients
        self.bytes_up, self.bytes_down = [0] * num_clients, [0] * num_clients

    def add(self, u: int, up: int, up_size: int, down: int, down_size: int) -> None:
        self.values_up[u] += up
        self.values_down[u] += down
        self.bytes_up[u] += up * up_size
        self.bytes_down[u] += down * down_size


def _concatenate(adapters: Sequence[LoraAdapter], names: list[str], factor: str, dtype, device) -> Tensor:
    """Stack the modules and concatenate the clients along the rank axis, in one preallocated copy on `device`."""
    first = [getattr(a.modules[names[0]], factor) for a in adapters]
    axis = 1 if factor == "B" else 0
    shape = list(first[0].shape)
    shape[axis] = sum(t.shape[axis] for t in first)
    out = torch.empty(len(names), *shape, dtype=dtype, device=device)
    for i, name in enumerate(names):
        torch.cat([getattr(a.modules[name], factor).to(device) for a in adapters], dim=axis, out=out[i])
    return out


def _require_finite(adapters: Sequence[LoraAdapter], labels: Sequence[str], names: list[str]) -> None:
    for a, label in zip(adapters, labels):
        for name in names:
            for factor in ("A", "B"):
                if has_non_finite(getattr(a.modules[name], factor)):
                    raise FloranaError(f"{label}: module {name}: lora_{factor} holds NaN or Inf")


def _norms(factors: Tensor) -> Tensor:
    """‖·‖_F of each module's factor (M,), summed in float32 at least: 20× faster than float64 on the output
    factors, and exact enough for a diagnostic."""
    return torch.linalg.vector_norm(factors, dim=(-2, -1), dtype=torch.promote_types(factors.dtype, torch.float32))


def _relative(err_sq: float, target_sq: float) -> float:
    """sqrt(err²/target²); 0 when both vanish (e.g. every B still at its zero init)."""
    if target_sq <= 0:
        return 0.0 if err_sq <= 0 else math.inf
    return math.sqrt(max(err_sq, 0.0) / target_sq)
