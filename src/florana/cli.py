"""The `florana` command line: aggregate | run | compare | report | export | demo."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from florana.errors import FloranaError
from florana.report.tables import BASELINE, TARGET

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
    out: Annotated[Path, typer.Option(help="Output directory for the global PEFT adapter: new or empty, or an "
                                           "adapter folder with --force.")],
    method: Annotated[str, typer.Option(help="fedit | ffa | fedsa | flora | fedex | florana | svd | hetlora | "
                                             "flexlora | rolora | lora_fair | fedsvd")] = "florana",
    weights: Annotated[str, typer.Option(help="'uniform' or W1,W2,... (e.g. example counts).")] = "uniform",
    report: Annotated[Path | None, typer.Option(help="Write the aggregation report as JSON here.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace the adapter files of an existing adapter folder "
                                                        "--out (its other files are kept).")] = False,
    round_: Annotated[int, typer.Option("--round", min=1, help="The round these adapters close, where the method "
                                                               "depends on it: rolora trains B in odd rounds (A frozen),"
                                                               " A in even ones; fedsvd re-factors.")] = 1,
) -> None:
    """Aggregate client LoRA adapters into one global PEFT adapter (written atomically)."""
    from florana.aggregation import aggregate_adapters
    from florana.federation.checkpoint import write_text_atomic
    from florana.lora import load_adapter, save_adapter
    from florana.lora.peft_io import check_output

    try:
        check_output(out, clients, force)
        adapters = [load_adapter(c) for c in clients]
        result = aggregate_adapters(adapters, method, parse_weights(weights),
                                    labels=[str(c) for c in clients], round_=round_)
        save_adapter(result.adapter, out, result.base_update)
        summary = result.report.to_json()
        if report is not None:
            report.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(report, json.dumps(summary, indent=2) + "\n")
    except FloranaError as e:
        fail(str(e))
    typer.echo(f"{method}: {len(clients)} clients → {out}  relative error {summary['relative_error']:.4g} "
               f"(rank-r floor {summary['error_floor']:.4g}), up {summary['bytes_up_total']:,} B, "
               f"down {summary['bytes_down_total']:,} B")


TargetOpt = Annotated[float, typer.Option(min=0.0, max=1.0, help="Accuracy whose first reaching is timed: rounds, "
                                                                 "seconds and MiB on the wire until it.")]
BaselineOpt = Annotated[str, typer.Option(help="The method every other is paired against, seed by seed.")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML file with RunConfig keys.")]


def build_config(config_path: Path | None, **overrides):
    from florana.config import RunConfig, load_config

    base = load_config(config_path) if config_path else RunConfig()
    return base.with_overrides(**overrides)


def progress_for(quiet: bool):
    from contextlib import nullcontext

    from florana.federation.progress import RichProgress, log_to_stderr

    if quiet:
        log_to_stderr()
        return nullcontext(None)
    return RichProgress()


PIPED_WIDTH = 180  # a log file or pipe has no width; rich would assume 80 and cut every number to "0.7…"


def print_rows(rows) -> None:
    from rich.console import Console

    from florana.report.tables import rich_table

    console = Console()
    if not console.is_terminal:
        console = Console(width=PIPED_WIDTH)
    console.print(rich_table(rows))


@app.command()
def run(
    config: ConfigOpt = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (default runs/<method>-<time>).")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue the run in this folder from its last round.")] = None,
    method: Annotated[str | None, typer.Option(help="Aggregator, or centralized | local.")] = None,
    rounds: Annotated[int | None, typer.Option(help="Federated rounds; with --resume, more than are done extend "
                                                    "the run.")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    alpha: Annotated[float | None, typer.Option(help="Dirichlet α of the partition.")] = None,
    num_clients: Annotated[int | None, typer.Option()] = None,
    local_steps: Annotated[int | None, typer.Option()] = None,
    partition: Annotated[str | None, typer.Option(help="iid | dirichlet | shards | quantity")] = None,
    dataset: Annotated[str | None, typer.Option()] = None,
    model: Annotated[str | None, typer.Option()] = None,
    task: Annotated[str | None, typer.Option(help="classification | causal_lm | code")] = None,
    text_column: Annotated[str | None, typer.Option()] = None,
    label_column: Annotated[str | None, typer.Option()] = None,
    client_ranks: Annotated[str | None, typer.Option(help="Each client's LoRA rank, e.g. 4,8,16 (a shorter list "
                                                          "is cycled over the clients).")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda | cuda:N (with --resume: where the rest of "
                                                    "the run goes).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="Log lines only, no progress display.")] = False,
    runtime: Annotated[str, typer.Option(help="inprocess (one process) | flower (Flower's simulation engine on "
                                              "Ray, one virtual SuperNode per client).")] = "inprocess",
    min_nodes: Annotated[int, typer.Option(help="flower: fewest replies a round accepts before the run stops.")] = 1,
    gpus_per_client: Annotated[float, typer.Option(min=0.0, help="flower: the share of a GPU Ray gives each client "
                                                                 "(e.g. 0.25: four clients train on one GPU at "
                                                                 "once); 0: clients train on the CPU.")] = 0.0,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Any other config key, KEY=VALUE (repeatable; "
                                                                "a list key takes a,b,c), e.g. --set dp=sample")] = None,
) -> None:
    """Federated LoRA fine-tuning (offline MiniLM + Rotten Tomatoes by default), in one process or on Flower.
    With --resume, flags and --config must match the run's config, except --rounds, which extends it."""
    from florana.federation.compare import parse_settings

    try:
        flags = dict(method=method, rounds=rounds, seed=seed, alpha=alpha, num_clients=num_clients,
                     local_steps=local_steps, partition=partition, dataset=dataset, model=model, task=task,
                     text_column=text_column, label_column=label_column, device=device,
                     client_ranks=None if client_ranks is None else _numbers(client_ranks, int, "--client-ranks"))
        for key, value in parse_settings(set_ or []).items():
            if flags.get(key) is not None:
                raise FloranaError(f"--set {key} repeats --{key.replace('_', '-')}: give it once")
            flags[key] = value
        if resume is not None:
            extend_run(resume, config, flags)
            cfg = None
        else:
            cfg = build_config(config, **flags)
        if runtime not in ("inprocess", "flower"):
            raise FloranaError(f"--runtime must be inprocess or flower, not {runtime!r}")
        if gpus_per_client and runtime != "flower":
            raise FloranaError("--gpus-per-client is for --runtime flower (in one process, --device says where the "
                               "run computes)")
    except FloranaError as e:
        fail(str(e))
    run_dir = resume or out or Path("runs") / f"{cfg.method}-{_stamp()}"
    _run_and_print(cfg, run_dir, resume is not None, quiet, runtime=runtime, min_nodes=min_nodes,
                   gpus_per_client=gpus_per_client)


def extend_run(run_dir: Path, config_path: Path | None, flags: dict) -> None:
    """--resume with --config or flags: they must agree with the run's stored config, save a larger --rounds,
    which is written into it (so both runtimes resume with it)."""
    from florana.config import load_config
    from florana.federation.engine import resumed_config

    if config_path is None and all(v is None for v in flags.values()):
        return
    base = load_config(config_path) if config_path else resumed_config(run_dir)
    resumed_config(run_dir, base.with_overrides(**flags))


def _run_and_print(cfg, run_dir: Path, resume: bool, quiet: bool, runtime: str = "inprocess",
                   min_nodes: int = 1, gpus_per_client: float = 0.0) -> None:
    """Run (or resume) one federation with a progress display, then print its table."""
    from florana.federation.engine import run as run_federation
    from florana.report.tables import Run, label_runs, summarize

    try:
        if runtime == "flower":
            from florana.federation.progress import log_to_stderr
            from florana.flower.simulation import run as run_on_flower

            log_to_stderr()
            result = run_on_flower(cfg, run_dir, resume=resume, min_nodes=min_nodes, gpus_per_client=gpus_per_client)
        else:
            with progress_for(quiet) as progress:
                result = run_federation(cfg, run_dir, resume=resume, progress=progress)
    except FloranaError as e:
        fail(str(e))
    print_rows(summarize(label_runs([Run(result.history)])))
    typer.echo(f"run folder: {result.run_dir}  (metrics.jsonl, global_adapter/, plots/, checkpoints/)")


@app.command()
def compare(
    methods: Annotated[str, typer.Option(help="Comma-separated; 'all' for every aggregator and both bounds.")] = "all",
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds.")] = "0",
    alpha: Annotated[str, typer.Option(help="Comma-separated Dirichlet α values.")] = "0.5",
    config: ConfigOpt = None,
    out: Annotated[Path, typer.Option(help="Folder for the runs, summary.md/csv and plots/.")] = Path("runs/compare"),
    rounds: Annotated[int | None, typer.Option()] = None,
    client_ranks: Annotated[str | None, typer.Option(help="Each client's LoRA rank, e.g. 4,8,16 (cycled over the "
                                                          "clients).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet")] = False,
    force: Annotated[bool, typer.Option("--force", help="Redo a run whose folder holds another config (it is "
                                                        "removed first).")] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Another config key to vary, KEY=V1,V2,... "
                                                                "(repeatable; every combination runs; a key named "
                                                                "after a method varies for that method only).")] = None,
    reuse: Annotated[list[Path] | None, typer.Option(help="A summary folder (e.g. results/<name>, committed) or run "
                                                       "folder whose finished runs of a planned name and config "
                                                       "are taken as they are, not run again (repeatable).")] = None,
    target: TargetOpt = TARGET,
    baseline: BaselineOpt = BASELINE,
) -> None:
    """Run every method × seed × α (× --set values) on identical partitions (one folder per run; a finished run of
    the same config is reused, an unfinished one resumed); then summarise them as `florana report` does."""
    from florana.federation.compare import compare as run_compare
    from florana.federation.compare import parse_grid
    from florana.aggregation import METHODS
    from florana.federation.methods import ALL_METHODS, check_method, check_ranks

    try:
        names = list(ALL_METHODS) if methods == "all" else [m.strip() for m in methods.split(",") if m.strip()]
        for name in [*names, baseline]:
            check_method(name)
        grid = parse_grid(set_ or [])
        seed_list = _numbers(seeds, int, "--seeds")
        alphas = _numbers(alpha, float, "--alpha")
        ranks = None if client_ranks is None else _numbers(client_ranks, int, "--client-ranks")
        base = build_config(config, rounds=rounds, alpha=alphas[0], client_ranks=ranks)
        if base.error_feedback:  # 'all': every method error feedback applies to; others are an error, saying why
            names = [n for n in names if n in METHODS and METHODS[n].feeds_back] if methods == "all" else names
            for name in names:
                check_method(name, error_feedback=True)
        if len(set(base.ranks())) > 1:  # likewise 'all' with mixed ranks: the methods that accept them
            names = [n for n in names if n not in METHODS or METHODS[n].mixed_ranks] if methods == "all" else names
            for name in names:
                check_ranks(name, base.ranks())
        with progress_for(quiet) as progress:
            rows = run_compare(base, names, seed_list, alphas, out, progress=progress, force=force, target=target,
                               baseline=baseline, grid=grid, reuse=reuse)
    except FloranaError as e:
        fail(str(e))
    print_rows(rows)
    _echo_outputs(out)


def _echo_outputs(out: Path) -> None:
    typer.echo(f"tables: {out / 'summary.md'}, summary.csv, paired.csv, runs.csv, rounds.csv; "
               f"plots: {out / 'plots'}; provenance.json, run_configs/ and histories/")


@app.command()
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run folders, folders of runs (florana compare's out), or "
                                                        "summary folders (report's out: the runs they record).")],
    out: Annotated[Path | None, typer.Option(help="Where the summary goes (default: the first folder): a new or empty "
                                                  "folder (e.g. results/<name>, to commit), or a run or compare "
                                                  "folder.")] = None,
    runs: Annotated[str | None, typer.Option("--runs", help="Only the runs whose name this regular expression "
                                                             "matches (re.search).")] = None,
    target: TargetOpt = TARGET,
    baseline: BaselineOpt = BASELINE,
) -> None:
    """Summarise finished runs: summary.md/csv (mean, std and 95% t interval over seeds per method and setting),
    paired.csv (differences against the baseline on the same seeds), runs.csv, rounds.csv, plots/, run_configs/,
    histories/ and provenance.json; no checkpoints or adapters. A summary folder given as input adds the runs it
    records, so a committed summary grows with new runs on any machine."""
    from florana.federation.folders import check_report_folder
    from florana.report.summary import find_runs, write_summary

    try:
        found = find_runs(run_dirs, only=runs)
        if not found:
            raise FloranaError("no finished rounds in these runs")
        check_report_folder(out or run_dirs[0])
        rows = write_summary(found, out or run_dirs[0], target, baseline)
    except FloranaError as e:
        fail(str(e))
    print_rows(rows)
    _echo_outputs(out or run_dirs[0])


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A finished run folder.")],
    adapter: Annotated[Path | None, typer.Option(help="Write the global LoRA adapter here, a PEFT folder (new or "
                                                      "empty), for PeftModel.from_pretrained on the run's base "
                                                      "model; not for flora or fedex, which change the base.")] = None,
    merged: Annotated[Path | None, typer.Option(help="Write the full merged model here (new or empty folder): base + "
                                                     "adapter + any base change, with its tokenizer and label names, "
                                                     "for transformers' AutoModelFor*.from_pretrained.")] = None,
) -> None:
    """Export a finished run's global model: its PEFT adapter (--adapter) and/or a merged transformers model
    (--merged) that loads without florana. An unfinished run is refused (finish it with run --resume)."""
    from florana.federation.export import export_adapter, export_merged

    try:
        if adapter is None and merged is None:
            raise FloranaError("say what to export: --adapter OUT and/or --merged OUT")
        if adapter is not None:
            export_adapter(run_dir, adapter)
            typer.echo(f"adapter → {adapter}")
        if merged is not None:
            export_merged(run_dir, merged)
            typer.echo(f"merged model → {merged}")
    except FloranaError as e:
        fail(str(e))


@app.command()
def demo(quiet: Annotated[bool, typer.Option("--quiet")] = False) -> None:
    """The default federated fine-tuning, offline: MiniLM-L6 + LoRA on Rotten Tomatoes, 10 clients, FLoRA-NA."""
    from florana.config import RunConfig

    _run_and_print(RunConfig(), Path("runs") / f"demo-{_stamp()}", False, quiet)


def _numbers(text: str, kind, flag: str) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise FloranaError(f"{flag} takes comma-separated numbers, got {text!r}") from None


def _stamp() -> str:
    import time

    return time.strftime("%Y%m%d-%H%M%S")


def main() -> None:
    app()
