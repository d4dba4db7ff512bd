"""The `florana` command line: aggregate | run | compare | report | demo."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from florana.errors import FloranaError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Federated LoRA fine-tuning with FLoRA-NA and every major federated-LoRA aggregator.")


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.callback()
def _group() -> None:
    """Federated LoRA fine-tuning with FLoRA-NA and every major federated-LoRA aggregator."""


def parse_weights(text: str):
    """'uniform' → None, else comma-separated numbers (e.g. example counts)."""
    if text == "uniform":
        return None
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise FloranaError(f"--weights must be 'uniform' or comma-separated numbers, got {text!r}") from None


@app.command()
def aggregate(
    clients: Annotated[list[Path], typer.Argument(help="Client adapter directories (PEFT format).")],
    out: Annotated[Path, typer.Option(help="Output directory for the global PEFT adapter.")],
    method: Annotated[str, typer.Option(help="fedit | ffa | fedsa | flora | fedex | florana | svd")] = "florana",
    weights: Annotated[str, typer.Option(help="'uniform' or W1,W2,... (e.g. example counts).")] = "uniform",
    report: Annotated[Path | None, typer.Option(help="Write the aggregation report as JSON here.")] = None,
) -> None:
    """Aggregate client LoRA adapters into one global PEFT adapter (written atomically)."""
    from florana.aggregation import aggregate_adapters
    from florana.lora import load_adapter
    from florana.lora.peft_io import BASE_UPDATE_FILE, atomic_directory, write_adapter_files
    from florana.lora.peft_io import save_base_update

    try:
        adapters = [load_adapter(c) for c in clients]
        result = aggregate_adapters(adapters, method, parse_weights(weights),
                                    labels=[str(c) for c in clients])
        with atomic_directory(out) as tmp:
            write_adapter_files(result.adapter, tmp)
            if result.base_update:
                save_base_update(result.base_update, tmp / BASE_UPDATE_FILE)
        summary = result.report.to_json()
        if report is not None:
            report.parent.mkdir(parents=True, exist_ok=True)
            report.write_text(json.dumps(summary, indent=2) + "\n")
    except FloranaError as e:
        fail(str(e))
    typer.echo(f"{method}: {len(clients)} clients → {out}  relative error {summary['relative_error']:.4g} "
               f"(rank-r floor {summary['error_floor']:.4g}), up {summary['bytes_up_total']:,} B, "
               f"down {summary['bytes_down_total']:,} B")


def main() -> None:
    app()
