"""PNG plots of run histories, one line per method: the mean over seeds with a band of its 95% t interval, of the
global accuracy and the aggregation error against the round, the cumulative MiB against the round, the
accuracy against the cumulative MiB, and the logit spread against the round (classification)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from florana.report.stats import CONFIDENCE, mean_ci

# file, y, x, title
PANELS = (
    ("accuracy.png", "global_accuracy", "round", "global test accuracy"),
    ("error.png", "relative_error", "round", "relative aggregation error ‖ΔW*−sB̂Â‖/‖ΔW*‖ (dotted: rank-r floor)"),
    ("bytes.png", "cum_mib", "round", "cumulative MiB on the wire (up + down)"),
    ("accuracy_mib.png", "global_accuracy", "cum_mib", "global test accuracy against MiB on the wire"),
    ("spread.png", "global_logit_spread", "round",
     "spread of the global model's logits across test examples (near 0: nearly the same logits for every input)"),
)
AXIS = {"round": "round", "cum_mib": "cumulative MiB on the wire (up + down)"}
# where a metric can lie: a band is clipped to it (with two seeds a t interval is ±12.7 std and leaves [0, 1])
RANGE = {"global_accuracy": (0.0, 1.0), "relative_error": (0.0, None), "error_floor": (0.0, None),
         "cum_mib": (0.0, None)}


def paired_panel(baseline: str) -> tuple:
    """The panel of tables.paired_histories' differences: a method's accuracy minus the baseline's, by round."""
    return (f"accuracy_vs_{baseline}.png", f"global_accuracy_vs_{baseline}", "round",
            f"global test accuracy − {baseline}'s, paired by seed (0: no difference)")


def value(m: dict, key: str) -> float | None:
    """A round's metric; cum_mib is the bytes sent both ways up to and including the round, in MiB."""
    if key == "cum_mib":
        return (m.get("cum_bytes_up", 0) + m.get("cum_bytes_down", 0)) / 2**20
    return m.get(key)


def curve(histories: list[list[dict]], y: str, x: str = "round", confidence: float = CONFIDENCE) -> list[tuple]:
    """(mean x, mean y, low, high) per round that every history has a value of y for; low and high are the t
    interval over the histories (None for one), clipped to the metric's RANGE."""
    by_round = [{m["round"]: m for m in h} for h in histories]
    out = []
    for r in sorted(set.intersection(*(set(b) for b in by_round))):
        ys = [value(b[r], y) for b in by_round]
        if any(v is None for v in ys):
            continue
        xs = [value(b[r], x) for b in by_round]
        est = mean_ci(ys, confidence)
        out.append((sum(xs) / len(xs), est.mean, *_clipped(y, est.low, est.high)))
    return out


@dataclass(frozen=True)
class Recorded:
    """A label's line as a summary recorded it (its rows of rounds.csv or paired_rounds.csv: per round the mean and
    t interval over `seeds` runs), for runs whose histories that summary did not keep."""

    rows: list[dict]

    @property
    def n(self) -> int:
        return max(row["seeds"] for row in self.rows)

    def curve(self, y: str, x: str = "round") -> list[tuple]:
        """curve()'s points from the rows: the rounds every run had, where y has a value and, over several runs, an
        interval (a metric only one of them recorded has none: curve() leaves such a round out too)."""
        out = []
        for row in sorted(self.rows, key=lambda row: row["round"]):
            if (row["seeds"] != self.n or row.get(y) is None or row.get(x) is None
                    or (self.n > 1 and row.get(y + "_ci_low") is None)):
                continue
            out.append((row[x], row[y], *_clipped(y, row.get(y + "_ci_low"), row.get(y + "_ci_high"))))
        return out


def _clipped(y: str, low, high) -> tuple:
    """A band clipped to where the metric can lie (RANGE); None stays None (one seed)."""
    if low is None:
        return low, high
    floor, ceiling = RANGE.get(y, (None, None))
    return (low if floor is None else max(low, floor)), (high if ceiling is None else min(high, ceiling))


def _points(line, y: str, x: str, confidence: float) -> list[tuple]:
    return line.curve(y, x) if isinstance(line, Recorded) else curve(line, y, x, confidence)


def _n(line) -> int:
    return line.n if isinstance(line, Recorded) else len(line)


def _has(line, y: str) -> bool:
    if isinstance(line, Recorded):
        return any(row.get(y) is not None for row in line.rows)
    return any(value(m, y) is not None for h in line for m in h)


def plot_runs(histories: dict[str, list[dict]], out_dir: Path) -> list[Path]:
    """One line per label (a method, or method@seed), each one history."""
    return plot_bands({label: [h] for label, h in histories.items()}, out_dir)


def plot_bands(runs: dict[str, list[list[dict]] | Recorded], out_dir: Path, confidence: float = CONFIDENCE,
               panels: tuple = PANELS) -> list[Path]:
    """One line per label: the mean over its histories (its seeds) with a band of the t interval where there are
    two or more (an error bar for a single point), or the same as a summary recorded it (Recorded); the error panel adds each label's mean rank-r floor, dotted. A
    label whose runs send nothing (the centralized and local bounds) is a dashed level at its last accuracy on the
    MiB panel. A difference panel (paired_panel) has a line at 0. A panel whose metric no history records (the
    logit spread of a causal LM) is not written."""
    os.environ.setdefault("MPLCONFIGDIR", str(Path(out_dir).parent / ".mpl"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    palette = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20")
    colours = {label: palette(i % palette.N) for i, label in enumerate(runs)}
    written = []
    for filename, y, x, title in panels:
        if not any(_has(line, y) for line in runs.values()):
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        drawn = False
        if "_vs_" in y:
            ax.axhline(0.0, color="gray", lw=0.8)
        for label, line in runs.items():
            colour = colours[label]
            points = _points(line, y, x, confidence)
            if x == "cum_mib" and points and all(p[0] == 0 for p in points):
                ax.axhline(points[-1][1], ls="--", lw=1, color=colour, label=f"{label} (no wire)")
                drawn = True
                continue
            if not points:
                continue
            xs, means = [p[0] for p in points], [p[1] for p in points]
            ax.plot(xs, means, marker="o", ms=3, color=colour, label=f"{label} (n={_n(line)})")
            banded = [p for p in points if p[2] is not None]
            if len(banded) == 1:  # one point (local's last round): an error bar
                bx, by, low, high = banded[0]
                ax.errorbar(bx, by, yerr=[[by - low], [high - by]], color=colour, capsize=3)
            elif banded:
                ax.fill_between([p[0] for p in banded], [p[2] for p in banded], [p[3] for p in banded],
                                color=colour, alpha=0.15, lw=0)
            if y == "relative_error":
                floor = _points(line, "error_floor", x, confidence)
                if floor:
                    ax.plot([p[0] for p in floor], [p[1] for p in floor], ls=":", color=colour)
            drawn = True
        ax.set_xlabel(AXIS[x])
        if x == "round":
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_title(title, fontsize=9)
        if drawn:
            ax.legend(fontsize=7, ncol=2 if len(runs) > 6 else 1)
        if any(_n(line) > 1 for line in runs.values()):
            fig.text(0.99, 0.01, f"mean over seeds; band: {confidence:.0%} t interval (within the metric's range)", ha="right", fontsize=7,
                     color="gray")
        fig.tight_layout()
        path = out_dir / filename
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
