"""Summary tables over runs: mean ± std over seeds of the final round's numbers, per (method, alpha)."""

from __future__ import annotations

import csv
import io
from collections import defaultdict

import numpy as np

COLUMNS = (
    ("global_accuracy", "global acc"),
    ("local_accuracy_mean", "local acc"),
    ("local_global_gap", "local−global gap"),
    ("relative_error", "agg. error"),
    ("error_floor", "rank-r floor"),
    ("total_mib", "total MiB"),
)


def final_numbers(history: list[dict]) -> dict:
    """The last round's metrics (its score on the whole test set where rounds scored a subset: eval_max_examples),
    the mean aggregation error over rounds, and the total MiB on the wire."""
    last = history[-1]
    errors = [m["relative_error"] for m in history if m.get("relative_error") is not None]
    floors = [m["error_floor"] for m in history if m.get("error_floor") is not None]
    return {
        "method": last["method"], "alpha": last.get("alpha"), "seed": last.get("seed"), "rounds": last["round"],
        "global_accuracy": last.get("final_global_accuracy", last.get("global_accuracy")),  # the whole test set
        "local_accuracy_mean": last.get("local_accuracy_mean"),
        "local_global_gap": last.get("local_global_gap"),
        "relative_error": float(np.mean(errors)) if errors else None,
        "error_floor": float(np.mean(floors)) if floors else None,
        "total_mib": (last.get("cum_bytes_up", 0) + last.get("cum_bytes_down", 0)) / 2**20,
    }


def summarize(histories: list[list[dict]]) -> list[dict]:
    """One row per (method, alpha), sorted by alpha then method: mean and std over seeds of each column."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for h in histories:
        f = final_numbers(h)
        groups[(f["method"], f["alpha"])].append(f)
    rows = []
    for (method, alpha), finals in sorted(groups.items(), key=lambda kv: (str(kv[0][1]), kv[0][0])):
        row = {"method": method, "alpha": alpha, "seeds": len(finals)}
        for key, _ in COLUMNS:
            values = [f[key] for f in finals if f[key] is not None]
            row[key] = float(np.mean(values)) if values else None
            row[key + "_std"] = float(np.std(values)) if len(values) > 1 else (0.0 if values else None)
        rows.append(row)
    return rows


def _cell(row: dict, key: str) -> str:
    mean, std = row[key], row[key + "_std"]
    if mean is None:
        return "–"
    digits = 1 if key == "total_mib" else 4
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if row["seeds"] > 1 else f"{mean:.{digits}f}"


def to_markdown(rows: list[dict]) -> str:
    head = "| method | α | seeds | " + " | ".join(title for _, title in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (3 + len(COLUMNS))]
    for row in rows:
        lines.append(f"| {row['method']} | {row['alpha']} | {row['seeds']} | "
                     + " | ".join(_cell(row, k) for k, _ in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    keys = ["method", "alpha", "seeds"] + [k + s for k, _ in COLUMNS for s in ("", "_std")]
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row[k] for k in keys})
    return buf.getvalue()


def rich_table(rows: list[dict]):
    from rich.table import Table

    table = Table(title="florana: final round (mean ± std over seeds)")
    table.add_column("method", no_wrap=True, min_width=11)
    for name in ["α", "seeds"] + [title for _, title in COLUMNS]:
        table.add_column(name, justify="right")
    for row in rows:
        table.add_row(row["method"], str(row["alpha"]), str(row["seeds"]), *[_cell(row, k) for k, _ in COLUMNS])
    return table
