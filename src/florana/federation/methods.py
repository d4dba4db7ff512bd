"""Names a run accepts: every aggregator plus the two bounds that never aggregate."""

from florana.aggregation import METHODS, get_method

BOUNDS = ("centralized", "local")
ALL_METHODS = (*METHODS, *BOUNDS)


def check_method(name: str) -> None:
    if name not in BOUNDS:
        get_method(name)
