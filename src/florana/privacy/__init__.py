"""Differential privacy: per-example clipping and Gaussian noise (DP-SGD at each client), client-level clipping and
noise on the sum of updates (DP-FedAvg at the server), and the accountant that turns them into ε at δ. Pure functions
on tensors and numbers, called by the local training loop and the server step; nothing here imports Flower or the CLI.
"""

from florana.privacy.accountant import PrivacyPlan, calibrate_noise, epsilon
from florana.privacy.mechanisms import (clip_per_example, clip_update, dp_seed, dp_fedavg, gaussian_noise, poisson_batches,
                                        update_norm)

__all__ = ["PrivacyPlan", "calibrate_noise", "clip_per_example", "clip_update", "dp_fedavg", "dp_seed", "epsilon",
           "gaussian_noise", "poisson_batches", "update_norm"]
