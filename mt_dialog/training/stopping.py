"""When a run stops before ``--train-iters``: Megatron-LM's exit conditions, agreed by every rank.

    --exit-interval N          after the first iteration that is a multiple of N
    --exit-duration-in-mins M  after the first iteration that ends M minutes after the start
    --exit-signal-handler      after the iteration during which SIGTERM arrived (what SLURM and
                               Kubernetes send before killing a job; torchrun forwards it)

The loop asks ``StopConditions.reason(iteration)`` after every iteration; the signal and the
clock are per process, so their flags are all-reduced (MAX) over the world: every rank stops
after the same iteration, saves the same checkpoint (with --save) and exits 0. The same command
with ``--load`` continues exactly where the run stopped.
"""

from __future__ import annotations

import signal
import time
from typing import Optional

import torch


class StopConditions:
    """The exit conditions of one run (``TrainConfig``); use as a context manager around the
    loop so that the SIGTERM handler is installed for its duration only."""

    def __init__(self, train, started: Optional[float] = None) -> None:
        self.interval = train.exit_interval
        self.minutes = train.exit_duration_in_mins
        self.handle_signal = bool(train.exit_signal_handler)
        self.started = time.time() if started is None else started
        self.received: Optional[str] = None
        self._previous = None

    def __enter__(self) -> "StopConditions":
        if self.handle_signal:
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        if self.handle_signal:
            signal.signal(signal.SIGTERM, self._previous)

    def _on_signal(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def reason(self, iteration: int) -> Optional[str]:
        """Why the run stops after ``iteration``, the same on every rank; None: go on."""
        if self.interval and iteration % self.interval == 0:
            return f"--exit-interval {self.interval}"
        if not (self.handle_signal or self.minutes):
            return None
        from mt_dialog.training import distributed

        elapsed = (time.time() - self.started) / 60
        flags = torch.tensor([1.0 if self.received else 0.0,
                              1.0 if self.minutes and elapsed >= self.minutes else 0.0],
                             device=distributed.device())
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        if flags[0].item() > 0:
            return "SIGTERM with --exit-signal-handler"
        if flags[1].item() > 0:
            return f"--exit-duration-in-mins {self.minutes:g} elapsed"
        return None
