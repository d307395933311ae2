"""The run folder: checkpoints (official layout + optimiser state), the CSV logs and the saved config.

<out_dir>/config.json            the TrainConfig of the run (schedule fields must not change on resume)
<out_dir>/checkpoints/iter_N.pth {'meta': {..., 'iter': N}, 'state_dict', 'optimizer'}; loads with load_model
<out_dir>/log.csv                iteration, lr, losses, clicks, seconds per iteration
<out_dir>/eval.csv               iteration, dataset, NoC@85/90, mIoU@1/5, samples
<out_dir>/loss.png               the loss / lr curve, redrawn at every checkpoint
Checkpoints are written to a temporary name and renamed, so a kill never leaves a half-written one.
On resume the CSV rows after the checkpoint's iteration (written before the kill) are dropped.
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from ..checkpoint import CheckpointError, load_torch_file, save_checkpoint
from ..modeling import InterFormer

CHECKPOINT_RE = re.compile(r"^iter_(\d+)\.pth$")
LOG_FIELDS = ("iter", "lr", "loss", "decode_loss", "aux_loss", "extra_clicks", "clicks_per_sample", "sec_per_iter",
              "data_sec")
EVAL_FIELDS = ("iter", "dataset", "protocol", "samples", "noc85", "noc90", "miou1", "miou5", "sec")


def checkpoint_path(out_dir: Path, iteration: int) -> Path:
    return out_dir / "checkpoints" / f"iter_{iteration:07d}.pth"


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """(iteration, path) of the complete checkpoints of a run, oldest first."""
    folder = out_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_RE.match(p.name))]
    return sorted(found)


def remove_stale_temporaries(out_dir: Path) -> int:
    """Delete checkpoint temp files (`.iter_N.pth.<pid>.<id>.tmp`) a killed writer left; call with the run
    folder's writer lock held, when no other process can be writing one. Returns how many were removed."""
    folder = out_dir / "checkpoints"
    stale = [p for p in folder.glob(".iter_*.tmp")] if folder.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


class NonFiniteWeights(RuntimeError):
    """The model holds NaN or infinite weights: it is not written as a checkpoint (nothing is pruned either)."""


def nonfinite_tensors(tensors: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors in `tensors` that hold a NaN or an infinity."""
    return [k for k, v in tensors.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(v.isfinite().all())]


def shown_names(names: Sequence[str], shown: int = 3) -> str:
    return f"{len(names)} tensor(s): " + ", ".join(names[:shown]) + (" ..." if len(names) > shown else "")


def save_training_checkpoint(model: InterFormer, optimizer: torch.optim.Optimizer, out_dir: Path, iteration: int,
                             config: dict[str, Any], keep: int = 0,
                             log_window: Sequence[dict[str, float]] = ()) -> Path:
    """Write iter_N.pth (model in the official layout, optimiser state alongside) and prune old ones.
    `log_window` holds the metrics of iterations not yet averaged into a log.csv row, so that a resumed run's
    next row averages over the same iterations as the uninterrupted run's. NonFiniteWeights, before anything is
    written or pruned, when a weight is NaN or infinite: the newest finite checkpoint is never replaced by one."""
    bad = nonfinite_tensors(model.state_dict())
    if bad:
        raise NonFiniteWeights(f"the weights at iteration {iteration} are not finite ({shown_names(bad)}); no "
                               "checkpoint was written")
    path = checkpoint_path(out_dir, iteration)
    meta = {"iter": iteration, "train_config": config}
    save_checkpoint(model, path, meta=meta, extra={"optimizer": optimizer.state_dict(),
                                                   "log_window": [{k: float(v) for k, v in m.items()} for m in log_window]})
    if keep > 0:
        for _, old in list_checkpoints(out_dir)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def load_training_checkpoint(path: Path) -> dict[str, Any]:
    """The raw checkpoint dict (meta, state_dict, optimizer). CheckpointError when the file is not a training
    checkpoint of this job or holds non-finite weights (a run must not resume from a diverged state)."""
    obj = load_torch_file(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} is not a training checkpoint of this job (it holds a {type(obj).__name__})")
    for key in ("meta", "state_dict", "optimizer"):
        if key not in obj:
            raise CheckpointError(f"{path} is not a training checkpoint of this job (no {key!r}); move it out of "
                                  "the run folder or use another --out-dir")
    if not isinstance(obj["state_dict"], dict):
        raise CheckpointError(f"{path}: 'state_dict' is a {type(obj['state_dict']).__name__}, not a state dict")
    bad = nonfinite_tensors(obj["state_dict"])
    if bad:
        raise CheckpointError(f"{path} holds non-finite weights ({shown_names(bad)}); remove it to resume from the "
                              "checkpoint before it")
    return obj


class CsvLog:
    """Append-only CSV with a fixed header; `truncate_after(i)` drops rows with iter > i (used on resume)."""

    def __init__(self, path: Path, fields: Sequence[str]) -> None:
        self.path, self.fields = path, tuple(fields)

    def rows(self) -> list[dict[str, str]]:
        if not self.path.is_file():
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def truncate_after(self, iteration: int) -> None:
        if not self.path.is_file():
            return
        kept = [r for r in self.rows() if r.get("iter", "").isdigit() and int(r["iter"]) <= iteration]
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields)
            w.writeheader()
            w.writerows(kept)
        tmp.replace(self.path)

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        new = not self.path.is_file() or self.path.stat().st_size == 0
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            if new:
                w.writeheader()
            for r in rows:
                w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
            f.flush()


class ScheduleChanged(ValueError):
    """The run folder holds a run with other schedule settings."""


def refuse_schedule_changes(out_dir: Path, config: dict[str, Any], schedule_fields: Sequence[str]) -> None:
    """Raise ScheduleChanged when a schedule setting differs from the run recorded in out_dir/config.json."""
    path = out_dir / "config.json"
    if not path.is_file():
        return
    config = json.loads(json.dumps(config))  # compare as stored: tuples become lists
    old = json.loads(path.read_text())
    changed = [f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in schedule_fields if old.get(k) != config.get(k)]
    if changed:
        raise ScheduleChanged(f"{out_dir} holds a run with other schedule settings ({'; '.join(changed)}); "
                              "resume with the same settings or use a new --out-dir")


def check_resume_config(out_dir: Path, config: dict[str, Any], schedule_fields: Sequence[str]) -> None:
    """Write config.json on the first run; on later runs refuse changed schedule settings (ScheduleChanged)."""
    refuse_schedule_changes(out_dir, config, schedule_fields)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "config.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True))
    tmp.replace(path)
