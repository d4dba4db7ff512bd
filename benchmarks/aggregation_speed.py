"""Server-side cost of every aggregator at LLaMA-2-7B shapes, factor space against the dense way.

32 layers × {q,k,v,o} = 128 modules of 4096×4096, LoRA r=16, U=10 clients, fp32, LoRA-like clients (a shared
A init plus drift). For each method: wall time of `aggregate_adapters` (the aggregation plus its report: exact
error and Eckart–Young floor), peak extra RSS over the clients' factors, and the same work done densely
(forming Σ_u B_u A_u per module; FLoRA-NA's ALS on dense products; a full SVD for `svd`), timed on a few
modules and scaled to 128. fedex's dense residual (8 GiB at this size) is timed on 4 modules and scaled. Everything runs in one process, side by side, so ratios are what matter.

    .venv/bin/python benchmarks/aggregation_speed.py [--layers 32] [--dense-modules 2]
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import torch

from florana.aggregation import aggregate_adapters
from florana.lora import LoraAdapter, LoraModule


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples RSS every millisecond in a thread; `.extra` is the peak above the level at entry."""

    def __enter__(self):
        self.base = self.peak = rss()
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, rss())
        self.extra = self.peak - self.base


def make_clients(layers: int, U: int, r: int, d: int, seed: int = 0) -> list[LoraAdapter]:
    g = torch.Generator().manual_seed(seed)
    names = [f"base_model.model.model.layers.{i}.self_attn.{p}_proj" for i in range(layers) for p in "qkvo"]
    A0 = {n: torch.randn(r, d, generator=g) / d ** 0.5 for n in names}
    clients = []
    for _ in range(U):
        mods = {n: LoraModule(A=A0[n] + 0.05 * torch.randn(r, d, generator=g) / d ** 0.5,
                              B=0.01 * torch.randn(d, r, generator=g)) for n in names}
        clients.append(LoraAdapter(config={"r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj"]},
                                   modules=mods))
    return clients


def dense_target(clients, name, w, s):
    return sum(wu * s * (a.modules[name].B @ a.modules[name].A) for wu, a in zip(w, clients))


def dense_fedit(clients, name, w, s):
    T = dense_target(clients, name, w, s)
    B = sum(wu * a.modules[name].B for wu, a in zip(w, clients))
    A = sum(wu * a.modules[name].A for wu, a in zip(w, clients))
    return (T - s * B @ A).norm() / T.norm()


def dense_svd(clients, name, w, s, r):
    T = dense_target(clients, name, w, s)
    U, S, Vh = torch.linalg.svd(T)
    return (T - (U[:, :r] * S[:r]) @ Vh[:r]).norm() / T.norm()


def dense_florana(clients, name, w, s, sweeps):
    """The same ALS, with every inner product taken between dense d×k matrices."""
    T = dense_target(clients, name, w, s)
    Bs = [s * a.modules[name].B for a in clients]
    As = [a.modules[name].A for a in clients]
    P = torch.tensor(w, dtype=torch.float64)
    Q = P.clone()
    for _ in range(sweeps):
        A_bar = sum(p.item() * a for p, a in zip(P, As))
        Z = [b @ A_bar for b in Bs]
        H = torch.tensor([[(zi * zj).sum().item() for zj in Z] for zi in Z], dtype=torch.float64)
        g = torch.tensor([(z * T).sum().item() for z in Z], dtype=torch.float64)
        Q = torch.linalg.solve(H + 1e-12 * H.trace() * torch.eye(len(Z)), g)
        B_bar = sum(q.item() * b for q, b in zip(Q, Bs))
        Z = [B_bar @ a for a in As]
        H = torch.tensor([[(zi * zj).sum().item() for zj in Z] for zi in Z], dtype=torch.float64)
        g = torch.tensor([(z * T).sum().item() for z in Z], dtype=torch.float64)
        P = torch.linalg.solve(H + 1e-12 * H.trace() * torch.eye(len(Z)), g)
    return P, Q


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--dense-modules", type=int, default=2, help="modules timed the dense way (then scaled)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="factor-space timings: the median of this many")
    ap.add_argument("--methods", default="fedit,ffa,fedsa,flora,florana,svd,hetlora,flexlora,fedex")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    clients = make_clients(args.layers, args.clients, args.rank, args.dim)
    if "ffa" in args.methods:  # ffa needs the shared frozen A
        ffa_clients = [LoraAdapter(a.config, {n: LoraModule(A=clients[0].modules[n].A, B=m.B)
                                              for n, m in a.modules.items()}) for a in clients]
    M = len(clients[0].modules)
    factor_bytes = sum(m.A.nbytes + m.B.nbytes for a in clients for m in a.modules.values())
    w = [1.0 / args.clients] * args.clients
    s = 2.0
    print(f"{M} modules of {args.dim}×{args.dim}, r={args.rank}, U={args.clients}, fp32, "
          f"{torch.get_num_threads()} threads; clients' factors {factor_bytes / 2**20:.0f} MiB")

    names = list(clients[0].modules)[: args.dense_modules]
    scale = M / len(names)
    rows = []
    aggregate_adapters([LoraAdapter(a.config, dict(list(a.modules.items())[:1])) for a in clients], "fedit")  # warm-up
    for method in args.methods.split(","):
        data = ffa_clients if method == "ffa" else clients
        part = 1.0
        if method == "fedex":  # its dense residual is d·k per module: time it on 4 modules and scale
            keep = list(data[0].modules)[:4]
            data = [LoraAdapter(a.config, {n: a.modules[n] for n in keep}) for a in data]
            part = M / len(keep)
        times = []
        for rep in range(args.repeats):
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                result = aggregate_adapters(data, method)
                times.append(time.perf_counter() - t0)
            if rep == 0:
                extra = mem.extra
            if rep < args.repeats - 1:
                del result
        seconds = sorted(times)[len(times) // 2] * part
        dense = None
        if method in ("fedit", "svd", "florana"):
            t0 = time.perf_counter()
            for n in names:
                if method == "fedit":
                    dense_fedit(clients, n, w, s)
                elif method == "svd":
                    dense_svd(clients, n, w, s, args.rank)
                else:
                    dense_florana(clients, n, w, s, result.report.modules[n]["sweeps"])
            dense = (time.perf_counter() - t0) * scale
        rows.append((method, seconds, extra / factor_bytes if part == 1.0 else None, dense,
                     result.report.relative_error, result.report.error_floor))
        del result

    print()
    print("| method | factor-space s | peak extra memory / factors | dense way s (scaled) | speed-up | "
          "relative error | rank-r floor |")
    print("|---|---|---|---|---|---|---|")
    for method, sec, mem, dense, err, floor in rows:
        speed = f"{dense / sec:.0f}×" if dense else "–"
        dense_s = f"{dense:.1f}" if dense else "–"
        mem_s = f"{mem:.2f}×" if mem is not None else "(4 modules, scaled)"
        print(f"| {method} | {sec:.2f} | {mem_s} | {dense_s} | {speed} | {err:.4f} | {floor:.4f} |")
    print()
    for method, sec, mem, dense, *_ in rows:
        if method in ("florana", "svd"):
            ok = sec <= 3.0 and dense / sec >= 20 and mem <= 2.0
            print(f"target {method}: {sec:.2f} s (≤ 3 s), {dense / sec:.0f}× faster than dense (≥ 20×), "
                  f"peak extra memory {mem:.2f}× the factors (≤ 2×): {'met' if ok else 'MISSED'}")


if __name__ == "__main__":
    main()
