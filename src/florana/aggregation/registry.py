"""Every aggregator by name."""

from florana.aggregation import (fedex, fedit, fedsa, fedsvd, ffa, flexlora, flora, florana, hetlora, lora_fair, rolora,
                                 svd)
from florana.aggregation.base import Method
from florana.errors import FloranaError

METHODS: dict[str, Method] = {m.METHOD.name: m.METHOD for m in (fedit, ffa, fedsa, flora, fedex, florana, svd,
                                                             hetlora, flexlora, rolora, lora_fair, fedsvd)}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise FloranaError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None
