"""Names a run accepts: every aggregator plus the two bounds that never aggregate; and a run's aggregator with the
options its config gives it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from florana.aggregation import METHODS, Method, get_method
from florana.config import differences
from florana.errors import FloranaError

if TYPE_CHECKING:
    from florana.config import RunConfig

BOUNDS = ("centralized", "local")
ALL_METHODS = (*METHODS, *BOUNDS)


def check_method(name: str, error_feedback: bool = False, secagg: bool = False) -> None:
    """An unknown name, or error feedback or secure aggregation where it makes no sense, is an error that says
    why."""
    if name in BOUNDS:
        if error_feedback or secagg:
            raise FloranaError(f"{'error_feedback' if error_feedback else 'secagg'}=true needs an aggregator; {name} "
                               "is a bound that aggregates nothing")
        return
    method = get_method(name)
    if secagg and not method.sum_shaped:
        usable = ", ".join(m.name for m in METHODS.values() if m.sum_shaped)
        raise FloranaError(f"secagg=true does not apply to {name}: with secure aggregation the server sees only the "
                           f"sum of the clients' uploads, but {method.needs_each_client} (it applies to {usable})")
    if secagg and error_feedback:
        raise FloranaError("secagg=true and error_feedback=true exclude each other: error feedback measures what "
                           "aggregation lost from each client's factors, which secure aggregation hides")
    if error_feedback and not method.feeds_back:
        why = ("it is exact: aggregation loses nothing to feed back" if method.exact else
               "its server never sees B, so it cannot know what aggregation lost" if method.personal_B else
               "it changes the base weights")
        usable = ", ".join(m.name for m in METHODS.values() if m.feeds_back)
        raise FloranaError(f"error_feedback=true does not apply to {name}: {why} (it applies to {usable})")


def method_owning(key: str, methods=METHODS) -> str | None:
    """The method a config key is named after ('lora_fair' for lora_fair_steps), or None for a shared key."""
    return max((m for m in methods if key.startswith(m + "_")), key=len, default=None)


def run_differences(old: RunConfig, new: RunConfig) -> dict[str, tuple]:
    """The keys whose values differ (each with (old, new)) and bear on the run: a key named after another method
    (florana_prox in a fedit run) changes nothing the run computes, so a changed default of one method leaves every
    other method's finished runs reusable."""
    return {k: v for k, v in differences(old, new).items() if method_owning(k) in (None, old.method, new.method)}


def method_options(config: RunConfig) -> dict:
    """The options the run config gives its aggregator (keys `<method>_<option>`)."""
    if config.method == "fedsvd":
        return {"period": config.fedsvd_period}
    if config.method == "lora_fair":
        return {"lam": config.lora_fair_lambda, "steps": config.lora_fair_steps, "lr": config.lora_fair_lr,
                "refit": config.lora_fair_refit}
    if config.method == "florana":
        return {"solver": config.florana_solver, "steps": config.florana_steps, "lr": config.florana_lr,
                "prox": config.florana_prox, "gauge": config.florana_gauge}
    if config.method == "svd":
        return {"split": config.svd_split}
    return {}


def method_of(config: RunConfig) -> Method | None:
    """The run's aggregator with its options; None for a bound."""
    return None if config.method in BOUNDS else get_method(config.method).configured(**method_options(config))


def check_ranks(name: str, ranks: list[int]) -> None:
    """Clients of different ranks need a method that accepts them (the bounds do: `local` trains each client at
    its own rank, `centralized` one adapter at the largest). rolora, lora_fair and fedsvd do not (yet)."""
    if len(set(ranks)) > 1 and name not in BOUNDS and not get_method(name).mixed_ranks:
        accepted = ", ".join(n for n, m in METHODS.items() if m.mixed_ranks)
        raise FloranaError(f"client_ranks gives the clients different ranks {sorted(set(ranks))}, which method "
                           f"{name!r} does not accept; methods that do: {accepted}, centralized, local")


def check_privacy(config: RunConfig) -> None:
    """DP settings that cannot hold are errors that say why: a noise level or a target is needed; sample-level DP
    trains clients on their own data (not the pooled centralized bound) with per-example hooks that gradient
    checkpointing's recomputed forward would double; client-level DP needs a server step that is a sum of the
    clients' updates, each client weighed alike (the sensitivity of the sum is then dp_clip) and at one rank."""
    if config.dp == "none":
        return
    if config.dp_noise == 0 and config.dp_epsilon == 0:
        raise FloranaError(f"dp={config.dp!r} needs dp_noise (a noise multiplier) or dp_epsilon (a target ε), or both")
    if config.dp == "sample":
        if config.method == "centralized":
            raise FloranaError("dp='sample' accounts per client; the centralized bound pools every client's data")
        if config.gradient_checkpointing:
            raise FloranaError("dp='sample' records per-example activations in the forward pass, which gradient "
                               "checkpointing recomputes; set gradient_checkpointing = false")
        return
    method = None if config.method in BOUNDS else get_method(config.method)
    if method is None or not method.sum_shaped:
        usable = ", ".join(m.name for m in METHODS.values() if m.sum_shaped)
        what = "a bound that aggregates nothing" if method is None else \
            method.needs_each_client
        raise FloranaError(f"dp='client' (DP-FedAvg adds noise to the sum of clipped client updates) does not apply "
                           f"to {config.method}: {what}; it applies to {usable}")
    if config.weighting != "uniform":
        raise FloranaError("dp='client' weighs every client alike (the sum's sensitivity is then dp_clip); set "
                           "weighting = \"uniform\"")
    if len(set(config.ranks())) > 1:
        raise FloranaError("dp='client' needs every client at one rank (client_ranks gives several)")
    if config.error_feedback:
        raise FloranaError("dp='client' hides the clients' factors behind noise; error_feedback needs them")
