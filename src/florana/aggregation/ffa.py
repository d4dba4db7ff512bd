"""FFA-LoRA: A stays frozen at the shared random init; only B is trained and averaged, which makes it exact.

Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024,
https://arxiv.org/abs/2403.12313. Only B crosses the wire; clients must hold the same A (checked).
"""

from florana.aggregation.base import Method, Wire
from florana.aggregation.fedit import estimate


def wire(r: int, r_out: int, d: int, k: int) -> Wire:
    return Wire(up=r * d, down=r_out * d)


METHOD = Method(name="ffa", paper="arXiv:2403.12313", estimate=estimate, wire=wire, exact=True, trains_A=False)
