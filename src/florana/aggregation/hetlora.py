"""HetLoRA: clients of different ranks, zero-padded to the largest rank and averaged with weights that follow the
size of each client's update.

Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models", EMNLP 2024,
https://arxiv.org/abs/2401.06432. The server zero-pads every client's factors to the largest rank, weighs client u
by the Frobenius norm of its update ("sparsity-weighted aggregation"), averages B and A separately with those
weights, and client u gets back the first r_u components. Inexact, like FedIT, of which it is a reweighting.

What the paper leaves open, and what we chose:
- The norm's scope: per LoRA module (every module has its own weights), as the public re-implementations do
  (SpecTraL's `aggregate_hetlora`, per layer).
- The norm of what: the update as the model applies it, ‖s_u B_u A_u‖_F. It equals the paper's ‖B_u A_u‖_F up to
  a common factor whenever the clients' scalings are equal; with α/r_u scalings the raw product of a rank-16
  client would weigh four times a rank-4 client's for the same update.
- With the client weights (uniform, or FedAvg's example counts): w'_u ∝ w_u ‖s_u B_u A_u‖_F, normalised to sum
  1 (with uniform weights, exactly the paper's). Where every update is zero (each B still at its zero init)
  the weights stay w. Non-LoRA tensors (a classification head) are averaged with w, as in every method.
- The scaling a client of another rank gets its share at: the product is kept, s_u·B_u·A_u = s·B̂[:, :r_u]Â[:r_u]
  (the run's client view, federation/engine.py); the paper uses one scaling for all ranks.
- Not implemented: the paper's rank self-pruning (clients shrinking their own rank by a magnitude rule); ranks
  are fixed per client (`client_ranks`).
The per-module weights are in the report (`hetlora_weights`).
"""

import torch
from torch import Tensor

from florana.aggregation.base import Estimate, Method, full_wire, weighted_mean_coefficients
from florana.aggregation.factors import ClientFactors


def update_norms(clients: ClientFactors) -> Tensor:
    """(M, U) ‖s_u B_u A_u‖_F per module, from client u's diagonal Gram blocks: ‖BA‖² = ⟨BᵀB, AAᵀ⟩."""
    norm_sq = torch.stack([(clients.gram_B[:, b, b] * clients.gram_A[:, b, b]).sum(dim=(-2, -1))
                           for b in clients.blocks], dim=-1)
    return norm_sq.clamp_min(0).sqrt() * clients.scale_vector.abs()


def norm_weights(clients: ClientFactors) -> Tensor:
    """(M, U) w'_u ∝ w_u ‖s_u B_u A_u‖_F, summing to 1 per module; the client weights where every update is zero."""
    w = clients.weights.to(clients.real)
    raw = w * update_norms(clients)
    total = raw.sum(-1, keepdim=True)
    return torch.where(total > 0, raw / total.where(total > 0, 1.0), w.expand_as(raw))


def estimate(clients: ClientFactors, scale: float) -> Estimate:
    """B̂ = Σ w'_u s_u [B_u 0] / scale, Â = Σ w'_u [A_u; 0], padded to the global rank."""
    w = norm_weights(clients)
    return Estimate(*weighted_mean_coefficients(clients, scale, clients.out_rank, weights=w),
                    info={"hetlora_weights": w})


METHOD = Method(name="hetlora", paper="arXiv:2401.06432", estimate=estimate, wire=full_wire, mixed_ranks=True,
                needs_each_client="its weights ∝ ‖s_u B_u A_u‖_F are computed per module from each client's "
                                  "factors (Flower's SecAgg+ carries one weight per client, not one per module)")
