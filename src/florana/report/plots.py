"""PNG plots of run histories: global accuracy, aggregation error and cumulative bytes against the round."""

from __future__ import annotations

import os
from pathlib import Path

PANELS = (
    ("accuracy.png", "global_accuracy", "global test accuracy"),
    ("error.png", "relative_error", "relative aggregation error ‖ΔW*−sB̂Â‖/‖ΔW*‖"),
    ("bytes.png", "cum_bytes", "cumulative MiB on the wire (up + down)"),
)


def plot_runs(histories: dict[str, list[dict]], out_dir: Path) -> list[Path]:
    """One line per label (a method, or method@seed); each history is a list of per-round metrics."""
    os.environ.setdefault("MPLCONFIGDIR", str(Path(out_dir).parent / ".mpl"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, key, title in PANELS:
        fig, ax = plt.subplots(figsize=(6, 4))
        drawn = False
        for label, history in histories.items():
            points = [(m["round"], _value(m, key)) for m in history]
            points = [(r, v) for r, v in points if v is not None]
            if points:
                ax.plot(*zip(*points), marker="o", ms=3, label=label)
                drawn = True
        if key == "relative_error":
            floors = [(m["round"], m.get("error_floor")) for h in histories.values() for m in h
                      if m.get("error_floor") is not None]
            if floors and len(histories) == 1:
                ax.plot(*zip(*floors), ls="--", color="gray", label="rank-r floor")
        ax.set_xlabel("round")
        ax.set_title(title, fontsize=10)
        if drawn:
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / filename
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def _value(m: dict, key: str):
    if key == "cum_bytes":
        return (m.get("cum_bytes_up", 0) + m.get("cum_bytes_down", 0)) / 2**20
    return m.get(key)
