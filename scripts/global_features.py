"""How varied a classification run's global model is on its test set, after its last checkpointed round: the logit
margin (class 1 − class 0) over the test examples (mean, std, mean per gold class) and the spread of the encoder's
[CLS] output (the per-dimension std across examples, averaged over dimensions). A global model that answers one
class for everything either has a biased head on varied features, or features that no longer vary (a collapsed
representation): this tells the two apart (issue 14: FLoRA-NA's seed-2 run at the majority answers).

    PYTHONPATH=src .venv/bin/python scripts/global_features.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from florana.config import load_config
from florana.errors import FloranaError
from florana.federation.checkpoint import latest_checkpoint
from florana.federation.engine import Federation
from florana.train.tasks import by_length


def spread(run: Path) -> str:
    cfg = load_config(run / "config.toml")
    if cfg.task != "classification":
        raise FloranaError(f"{run}: a {cfg.task} run; this looks at a classifier's margins")
    fed = Federation(cfg.with_overrides(threads=torch.get_num_threads()))
    found = latest_checkpoint(run)
    if found is None:
        raise FloranaError(f"{run}: no checkpoint")
    round_, tensors, meta = found
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


if __name__ == "__main__":
    torch.set_num_threads(1)
    for arg in sys.argv[1:]:
        print(spread(Path(arg)))
