"""Experiment tracking: TensorBoard (``--tensorboard-dir``) and Weights & Biases
(``--wandb-project``, ``--wandb-exp-name``, ``--wandb-save-dir``) behind one small interface.

``check_available(train_config)`` runs before any model is built (a missing package is one error
line on every rank). The loop then calls ``open_tracker(config)`` on every rank (the logging rank
opens the back-ends, the others get None), ``tracker.log(split, metrics, iteration)`` after every
training step (``"train"``) and validation (``"valid"``), and ``tracker.close()``. Every back-end
receives the same scalars: ``SPLIT/loss_per_turn``, ``SPLIT/loss_per_token``, on training
steps ``train/lr``, ``train/grad_norm`` (and ``train/loss_scale`` with --fp16), on validation the
per-turn metrics (``valid/accuracy``, ``valid/reply_length_5-16/loss_per_turn``, ...), for a
blend each dataset's losses (``train/dataset_text/loss_per_token``, ``valid/dataset_chat/...``),
with the iteration as the step. Non-finite values and counts are left out.
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Dict, List, Optional

import torch

from mt_dialog.config_utils import to_dict
from mt_dialog.training import distributed

SCALARS = ("loss per turn", "loss per token", "lr", "grad_norm", "loss_scale", "router load max",
           "router load min")  # (the last two: MoE models, moe.load_summary)
TURN_SCALARS = ("accuracy", "exact turns")  # validation's, with their groups (turn_metrics)
COUNTS = (": turns", ": loss tokens", ": conversations")  # a group's counts: not tracked

# TrainConfig field -> (module it needs, the setup.py extra that installs it)
PACKAGES = {"tensorboard_dir": ("tensorboard", "tensorboard"), "wandb_project": ("wandb", "wandb")}


def scalars(split: str, metrics: Dict[str, float]) -> Dict[str, float]:
    """``{"SPLIT/loss_per_turn": value, ...}`` of the finite tracked values in ``metrics``:
    ``SCALARS``, validation's ``turn_metrics`` (``valid/accuracy``,
    ``valid/reply_length_1-4/accuracy``, ``valid/turn_2/loss_per_turn``, ...) and a blend's
    per-dataset losses (``train/dataset_text/loss_per_turn``, ...)."""
    keys = [key for key in metrics if key in SCALARS or key in TURN_SCALARS
            or (": " in key and not key.endswith(COUNTS))]
    return {f"{split}/{key.replace(': ', '/').replace(' ', '_')}": float(metrics[key])
            for key in keys if math.isfinite(metrics[key])}


def check_available(train) -> None:
    """Refuse a tracking flag whose package is not installed (``train``: a ``TrainConfig``).

    Raises:
        ValueError: naming the flag, the package and how to install it.
    """
    for name, (module, extra) in PACKAGES.items():
        if getattr(train, name) and importlib.util.find_spec(module) is None:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{name}: {flag} needs the {module} package, which is not "
                             f"installed: pip install {module} (or pip install -e "
                             f"'.[{extra}]'), or drop {flag}")


class _TensorBoard:
    def __init__(self, folder: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=folder)

    def log(self, values: Dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, config) -> None:
        import wandb

        train = config.train
        folder = train.wandb_save_dir or train.save  # W&B writes into FOLDER/wandb/
        if folder:
            os.makedirs(folder, exist_ok=True)
        self.run = wandb.init(project=train.wandb_project, name=train.wandb_exp_name,
                              dir=folder, config=to_dict(config))

    def log(self, values: Dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class Tracker:
    """The open back-ends of the logging rank."""

    def __init__(self, backends: List) -> None:
        self.backends = backends

    def log(self, split: str, metrics: Dict[str, float], iteration: int) -> None:
        """Send the tracked scalars of ``metrics`` (see ``scalars``) at step ``iteration``."""
        values = scalars(split, metrics)
        if values:
            for backend in self.backends:
                backend.log(values, iteration)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()


def _open_backends(config) -> List:
    train, backends = config.train, []
    if train.tensorboard_dir:
        backends.append(_TensorBoard(train.tensorboard_dir))
    if train.wandb_project:
        backends.append(_WandB(config))
    return backends


def open_tracker(config) -> Optional[Tracker]:
    """Collective (every rank calls it): the logging rank's ``Tracker`` of the flags in
    ``config.train``; None on other ranks and without tracking flags.

    Raises:
        ValueError: on every rank, when the logging rank could not open a back-end (W&B not
            logged in, an unwritable folder...), with the reason on the logging rank.
    """
    train = config.train
    if not (train.tensorboard_dir or train.wandb_project):
        return None
    backends, problem = [], None
    if distributed.is_logging_rank():
        try:
            backends = _open_backends(config)
        except Exception as exc:  # third-party start-up (W&B login, network, files): any kind
            lines = str(exc).strip().splitlines()
            problem = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    failed = torch.tensor([1.0 if problem else 0.0], device=distributed.device())
    torch.distributed.all_reduce(failed, op=torch.distributed.ReduceOp.MAX)
    if failed.item() > 0:
        for backend in backends:
            backend.close()
        raise ValueError(
            f"tracking: could not open --tensorboard-dir / --wandb-project on the logging rank"
            f"{' (' + problem + ')' if problem else ' (see its error line)'}; for W&B run "
            "`wandb login` or set WANDB_MODE=offline, or drop the flag")
    return Tracker(backends) if backends else None
