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

import sys
from pathlib import Path

import numpy as np
import torch

from florana.config import load_config
from florana.errors import FloranaError
from florana.federation.checkpoint import checkpoint_at, latest_checkpoint
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
        tensors, meta = checkpoint_at(run, round_)
    fed.load_state(tensors, meta)
    f = features(fed)
    by_class = ", ".join(f"{m:+.3f}" for m in f["margin_by_class"])
    return (f"{run.name} (round {round_}): margin mean {f['margin_mean']:+.3f}, std {f['margin_std']:.3f}, by gold "
            f"class [{by_class}]; [CLS] spread {f['cls_spread']:.4g}")


def features(fed: Federation) -> dict:
    """The global model's margins (class 1 − class 0) on the whole test set, their mean by gold class, its accuracy
    and the spread of its [CLS] output, as `fed` holds the model now (its global tensors and base delta)."""
    fed.slots.write(fed.global_tensors)
    model, task, data = fed.model.eval(), fed.task, fed.data.test
    margins, feats = np.empty(len(data)), []
    with torch.no_grad():
        for idx in by_length([len(s) for s in data.ids], fed.config.eval_batch_size):
            out = model(**task.batch(data, idx), output_hidden_states=True)
            logits = out.logits.float()
            margins[idx] = (logits[:, 1] - logits[:, 0]).cpu().numpy()
            feats.append(out.hidden_states[-1][:, 0].float().cpu())
    gold = np.array(data.targets)
    return {"accuracy": float(((margins > 0) == gold).mean()), "margin_mean": float(margins.mean()),
            "margin_std": float(margins.std()), "margin_by_class": [float(margins[gold == c].mean()) for c in range(2)],
            "cls_spread": torch.cat(feats).std(0).mean().item()}


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
