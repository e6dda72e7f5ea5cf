"""The learner's per-step metrics as TensorBoard scalars (`RUN_DIR/tb/`) and, only when the
user names a project (environment DYNAMO_WANDB_PROJECT) and `wandb` is importable, Weights &
Biases. W&B is never required: without it the request is logged and TensorBoard goes on.

Every finite number of a metrics record becomes a scalar at the record's step; count lists
under a `*/hist` key (index = value) become histograms. metrics.jsonl stays the record of the
run; these are views of it.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("dynamo.telemetry")


def scalars(rec: dict[str, Any]) -> dict[str, float]:
    """The finite numeric fields of a metrics record (booleans, step and wall time excluded)."""
    return {k: float(v) for k, v in rec.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
            and k not in ("step", "time") and math.isfinite(v)}


def histograms(rec: dict[str, Any]) -> dict[str, np.ndarray]:
    """`*/hist` count lists as arrays of counts indexed by value."""
    return {k: np.asarray(v, dtype=np.int64) for k, v in rec.items()
            if k.endswith("/hist") and isinstance(v, list) and v and sum(v) > 0}


class ScalarWriter:
    def __init__(self, run_dir: Path, wandb_project: str | None = None,
                 config: dict[str, Any] | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))
        self.wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError:
                log.warning("W&B project %r requested but wandb is not installed; "
                            "TensorBoard only", wandb_project)
            else:
                self.wandb = wandb.init(project=wandb_project, name=Path(run_dir).name,
                                        dir=str(run_dir), config=config or {}, resume="allow")

    def write(self, rec: dict[str, Any]) -> None:
        step = int(rec["step"])
        for k, v in scalars(rec).items():
            self.tb.add_scalar(k, v, step)
        for k, counts in histograms(rec).items():
            values = np.arange(counts.size)
            self.tb.add_histogram_raw(
                k, min=float(values[counts > 0].min()), max=float(values[counts > 0].max()),
                num=int(counts.sum()), sum=float((values * counts).sum()),
                sum_squares=float((values ** 2 * counts).sum()),
                bucket_limits=(values + 0.5).tolist(), bucket_counts=counts.tolist(),
                global_step=step)
        self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars(rec), step=step)

    def close(self) -> None:
        self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
