"""Names a run accepts: every aggregator plus the two bounds that never aggregate; and a run's aggregator with the
options its config gives it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from florana.aggregation import METHODS, Method, get_method

if TYPE_CHECKING:
    from florana.config import RunConfig

BOUNDS = ("centralized", "local")
ALL_METHODS = (*METHODS, *BOUNDS)


def check_method(name: str) -> None:
    if name not in BOUNDS:
        get_method(name)


def method_options(config: RunConfig) -> dict:
    """The options the run config gives its aggregator (keys `<method>_<option>`)."""
    if config.method == "fedsvd":
        return {"period": config.fedsvd_period}
    if config.method == "lora_fair":
        return {"lam": config.lora_fair_lambda, "steps": config.lora_fair_steps, "lr": config.lora_fair_lr,
                "refit": config.lora_fair_refit}
    return {}


def method_of(config: RunConfig) -> Method | None:
    """The run's aggregator with its options; None for a bound."""
    return None if config.method in BOUNDS else get_method(config.method).configured(**method_options(config))
