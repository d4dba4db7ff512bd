"""What a run shows while it works: a rich progress display (rounds, client steps), or log lines only."""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("florana")


class RichProgress:
    """Two bars: rounds, and the client steps of the current round; a line per finished round."""

    def __init__(self):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = Console(stderr=True)
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), console=self.console, transient=False)
        self.rounds = self.steps = None

    def __enter__(self):
        self.bars.__enter__()
        return self

    def __exit__(self, *exc):
        self.bars.__exit__(*exc)

    def start_run(self, config, start: int) -> None:
        if self.rounds is not None:
            self.bars.remove_task(self.rounds)
            self.bars.remove_task(self.steps)
        self.rounds = self.bars.add_task(f"{config.method} seed {config.seed} α {config.alpha}: rounds",
                                         total=config.rounds, completed=start - 1)
        self.steps = self.bars.add_task("client steps", total=1)

    def start_round(self, round_: int, steps: int) -> None:
        self.bars.reset(self.steps, total=steps, description=f"round {round_}: client steps")

    def step(self) -> None:
        self.bars.advance(self.steps)

    def end_round(self, m: dict) -> None:
        self.bars.advance(self.rounds)
        def f(x):
            return "–" if x is None else f"{x:.4f}"
        self.console.print(f"round {m['round']}: global acc {f(m['global_accuracy'])}  local {f(m['local_accuracy_mean'])}"
                           f" (own majority {f(m.get('local_majority_mean'))})"
                           f"  error {f(m['relative_error'])} (floor {f(m['error_floor'])})  "
                           f"MiB {(m['cum_bytes_up'] + m['cum_bytes_down']) / 2**20:.1f}  {m['seconds']:.0f}s")


def log_to_stderr() -> None:
    """--quiet: no display, the run's log lines on stderr."""
    if not any(getattr(h, "stream", None) is sys.stderr for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
