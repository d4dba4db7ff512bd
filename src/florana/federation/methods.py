"""Names a run accepts: every aggregator plus the two bounds that never aggregate."""

from florana.aggregation import METHODS, get_method
from florana.errors import FloranaError

BOUNDS = ("centralized", "local")
ALL_METHODS = (*METHODS, *BOUNDS)


def check_method(name: str) -> None:
    if name not in BOUNDS:
        get_method(name)


def check_ranks(name: str, ranks: list[int]) -> None:
    """Clients of different ranks need a method that accepts them (the bounds do: `local` trains each client at
    its own rank, `centralized` one adapter at the largest)."""
    if len(set(ranks)) > 1 and name not in BOUNDS and not get_method(name).mixed_ranks:
        accepted = ", ".join(n for n, m in METHODS.items() if m.mixed_ranks)
        raise FloranaError(f"client_ranks gives the clients different ranks {sorted(set(ranks))}, which method "
                           f"{name!r} does not accept; methods that do: {accepted}, centralized, local")
