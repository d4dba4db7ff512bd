"""Client adapters for tests: random ones and LoRA-like ones (a shared A init plus training drift)."""

import torch

from florana.lora import LoraAdapter, LoraModule

PREFIX = "base_model.model."
SHAPES = {"layer.0.q": (12, 10), "layer.0.v": (12, 10), "layer.1.q": (12, 10), "mlp.up": (16, 10)}


def make_clients(num=4, rank=3, *, kind="random", ranks=None, alpha=6, rslora=False, seed=0, extra=False,
                 shapes=SHAPES, dtype=torch.float32):
    """kind='random': independent factors; 'lora': shared A plus small drift; 'shared': identical A's."""
    g = torch.Generator().manual_seed(seed)
    ranks = ranks or [rank] * num
    base_A = {n: torch.randn(max(ranks), k, generator=g) for n, (d, k) in shapes.items()}
    clients = []
    for u, r in enumerate(ranks):
        modules = {}
        for n, (d, k) in shapes.items():
            if kind == "random":
                A = torch.randn(r, k, generator=g)
            else:
                drift = 0.0 if kind == "shared" else 0.2
                A = base_A[n][:r] + drift * torch.randn(r, k, generator=g)
            modules[PREFIX + n] = LoraModule(A=A.to(dtype), B=torch.randn(d, r, generator=g).to(dtype))
        config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": rslora,
                  "target_modules": ["q", "v", "up"], "base_model_name_or_path": "tiny"}
        tensors = {PREFIX + "head.weight": torch.randn(2, 10, generator=g)} if extra else {}
        clients.append(LoraAdapter(config=config, modules=modules, extra=tensors))
    return clients


def scaling(adapter, rank=None):
    r = rank or adapter.config["r"]
    return adapter.config["lora_alpha"] / (r ** 0.5 if adapter.config.get("use_rslora") else r)


def ideal_update(clients, weights, name):
    """ΔW* = Σ_u w_u s_u B_u A_u, densely, in float64."""
    total = 0
    for w, a in zip(weights, clients):
        m = a.modules[name]
        total = total + w * a.scaling(name) * (m.B.double() @ m.A.double())
    return total


def applied_update(result, name):
    """What a client's model gets from an aggregation: s·B̂Â plus any dense base update, densely."""
    a = result.adapter
    m = a.modules[name]
    update = a.scaling(name) * (m.B.double() @ m.A.double())
    if name in result.base_update:
        update = update + result.base_update[name].double()
    return update
