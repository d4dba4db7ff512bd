"""How varied a classification run's global model is on its test set, after its last checkpointed round: the logit
margin (class 1 − class 0) over the test examples (mean, std, mean per gold class) and the spread of the encoder's
[CLS] output (the per-dimension std across examples, averaged over dimensions). A global model that answers one
class for everything either has a biased head on varied features, or features that no longer vary (a collapsed
representation): this tells the two apart (issue 14: FLoRA-NA's seed-2 run at the majority answers).

    PYTHONPATH=src .venv/bin/python scripts/global_features.py [--every-round] RUN_DIR [RUN_DIR ...]

--every-round prints a line for each checkpoint the run kept (`keep_checkpoints`), oldest first: in which round the
spread stopped growing or fell.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from florana.config import load_config
from florana.errors import FloranaError
from florana.federation.checkpoint import latest_checkpoint
from florana.federation.engine import Federation
from florana.train.tasks import by_length


def spread(run: Path, checkpoint: Path | None = None, fed: Federation | None = None) -> str:
    """The line for the run's last checkpoint, or for `checkpoint` (a checkpoints/round-NNNN folder of the run);
    `fed`: the run's Federation when one is at hand (it is loaded otherwise)."""
    cfg = load_config(run / "config.toml")
    if cfg.task != "classification":
        raise FloranaError(f"{run}: a {cfg.task} run; this looks at a classifier's margins")
    fed = fed or Federation(cfg.with_overrides(threads=torch.get_num_threads()))
    if checkpoint is None:
        found = latest_checkpoint(run)
        if found is None:
            raise FloranaError(f"{run}: no checkpoint")
        round_, tensors, meta = found
    else:
        round_ = int(checkpoint.name.removeprefix("round-"))
        tensors, meta = load_file(checkpoint / "state.safetensors"), json.loads((checkpoint / "state.json").read_text())
    fed.load_state(tensors, meta)
    fed.slots.write(fed.global_tensors)
    model, task, data = fed.model.eval(), fed.task, fed.data.test
    margins, features = np.empty(len(data)), []
    with torch.no_grad():
        for idx in by_length([len(s) for s in data.ids], cfg.eval_batch_size):
            out = model(**task.batch(data, idx), output_hidden_states=True)
            logits = out.logits.float()
            margins[idx] = (logits[:, 1] - logits[:, 0]).cpu().numpy()
            features.append(out.hidden_states[-1][:, 0].float().cpu())
    gold = np.array(data.targets)
    by_class = ", ".join(f"{margins[gold == c].mean():+.3f}" for c in range(2))
    cls_spread = torch.cat(features).std(0).mean().item()
    return (f"{run.name} (round {round_}): margin mean {margins.mean():+.3f}, std {margins.std():.3f}, by gold class "
            f"[{by_class}]; [CLS] spread {cls_spread:.4g}")


def every_round(run: Path) -> list[str]:
    """A line for each checkpoint the run kept, oldest first, with one Federation for all of them."""
    fed = Federation(load_config(run / "config.toml").with_overrides(threads=torch.get_num_threads()))
    return [spread(run, c, fed) for c in sorted((run / "checkpoints").glob("round-[0-9]*"))]


if __name__ == "__main__":
    torch.set_num_threads(1)
    args = sys.argv[1:]
    each = "--every-round" in args
    for arg in (a for a in args if a != "--every-round"):
        print("\n".join(every_round(Path(arg))) if each else spread(Path(arg)))
