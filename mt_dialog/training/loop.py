"""The dialogue SFT loop over packed datasets, on megatron-core (what ``pretrain_dialog.py``
calls). It is not a generic loop: it reads the run's packed dialogue datasets
(``training.data``: ``--data-path`` blends, each data-parallel rank its own packs), flattens each
micro-batch of packs into one 'thd' sequence, and logs the dialogue loss reports
(``loss.dialog_loss``: loss per turn, per token, per conversation). ``pretrain_dialog.py``
supplies the ``forward_step`` (model call + ``loss.make_loss_func``).

``pretrain(config, forward_step)`` checks the datasets and the parallel layout *before* building
anything, then: initialize groups -> build the model chunks + DDP + optimizer + LR schedule ->
optionally load a checkpoint -> for each step run megatron's forward-backward schedule over this
rank's micro-batches, step the optimizer, log one line per interval from one rank, evaluate, save.

A step's metrics (``train_step``, ``evaluate``) are exact global means: each loss report's sum
and count are added over the micro-batches and all-reduced over data-parallel ranks before
dividing (``_reduce_reports``), never averaged per micro-batch::

    loss per turn / per token / per conversation   the report's sum / count
    dataset NAME: loss per turn (token, conv.)     the same for each dataset of a blend
                                                   (``loss.dataset_report_names``), with its
                                                   counts (``dataset NAME: turns``, ``...: loss
                                                   tokens``, ``...: conversations``)
    turn_num                                       turns (the count of "loss per turn")
    num_loss_tokens                                trained tokens (the count of "loss per token")
    num_tokens, packs                              real (non-padding) tokens and packs read
    lr, grad_norm, skipped (, loss_scale)          training steps only
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from mt_dialog.config_utils import to_dict
from mt_dialog.data.dataset import PackedDialogDataset
from mt_dialog.training import context_parallel, distributed
from mt_dialog.training.checkpoint import (
    CheckpointError,
    StartPoint,
    check_model_matches,
    check_resume_matches,
    check_save_folder,
    is_weights_only,
    load_checkpoint,
    save_checkpoint,
    start_point,
)
from mt_dialog.training.config import DialogTrainingConfig, validate_schedule, validate_world
from mt_dialog.training.loss import POWER_REPORT, REPORT_OF, dataset_report_names
from mt_dialog.training.data import (
    DataInfo,
    SampleStream,
    blend_names,
    flatten_micro_batch,
    inspect_datasets,
    open_datasets,
    step_sample_indices,
)
from mt_dialog.training.model import check_precision, finish_param_gather
from mt_dialog.training.optimizer import build_optimizer
from mt_dialog.training.saved_run import (
    bundle_tokenizer,
    run_record,
    source_info,
    write_run_record,
)
from mt_dialog.training.stopping import StopConditions
from mt_dialog.training.tracking import open_tracker
from mt_dialog.training.turn_metrics import metrics_table, report_names, write_metrics

LOSS_REPORTS = ("loss per turn", "loss per token", "loss per conversation")  # dialog_loss's
# what a step adds up over its micro-batches and data-parallel ranks, by name: each loss report's
# sum and count, and the packs read with their real tokens
STEP_TOTALS = (*(f"{name} {part}" for name in LOSS_REPORTS for part in ("sum", "count")),
               "num_tokens", "packs")
COUNT_NAMES = {"loss per turn": "turns", "exact turns": "turns", "loss per token": "loss tokens",
               "loss per conversation": "conversations", POWER_REPORT: "power turns"}
"""The name under which a grouped report's count is kept (``GROUP: turns``, ...)."""


class TrainingError(RuntimeError):
    """The run cannot go on (NaN, bad data); the message names the iteration and the fix."""


@dataclass
class Run:
    """Everything the loop works with."""

    config: DialogTrainingConfig
    info: DataInfo
    model: List[torch.nn.Module]
    optimizer: object
    scheduler: object
    train_stream: SampleStream
    valid_sets: List[PackedDialogDataset]
    forward_step: Callable
    dp_size: int
    global_batch: int
    train_iters: int
    start: Optional[StartPoint] = None  # the checkpoint the run started from
    iteration: int = 0
    start_iteration: int = 0  # the iteration this launch started at
    consumed: int = 0
    writer: object = None
    history: List[Dict[str, float]] = field(default_factory=list)
    eval_forward_step: Optional[Callable] = None  # validation's; None: forward_step's losses
    lora_base: Optional[Dict] = None  # LoRA: the base checkpoint (lora_checkpoint.base_pointer)
    argv: Optional[List[str]] = None  # the command line (the run record's)


def _model_vocab(info: DataInfo, start: StartPoint) -> int:
    """The datasets' vocabulary, or the imported Hugging Face model's rows when it has more
    (Qwen2 models have spare rows; keeping them exports the same shape back)."""
    source = source_info(start.path) if start.path else {}
    return max(info.vocab_size, int(source.get("vocab_size") or 0))


def _setup(config: DialogTrainingConfig, info: DataInfo, datasets, start: StartPoint,
           forward_step, dp_size: int) -> Run:
    from megatron.core.distributed import finalize_model_grads

    from mt_dialog.training.model import (
        build_model_chunks,
        sync_functions,
        transformer_config,
        wrap_ddp,
    )

    tconfig = transformer_config(config)
    chunks = build_model_chunks(config, tconfig, _model_vocab(info, start), info.seq_length)
    model = wrap_ddp(chunks, tconfig, config)
    sync_functions(model, tconfig, config.parallel)
    tconfig.finalize_model_grads_func = finalize_model_grads
    stream, valid_sets = datasets
    global_batch = config.data.global_batch_size or config.data.micro_batch_size * dp_size
    train_iters = config.train.train_iters or max(
        1, math.ceil(config.train.train_epochs * len(stream) / global_batch))
    optimizer, scheduler = build_optimizer(config, model, train_iters)
    tconfig.grad_scale_func = optimizer.scale_loss  # the loss scale with --fp16, else 1
    return Run(config, info, model, optimizer, scheduler, stream, valid_sets, forward_step,
               dp_size, global_batch, train_iters, start=start)


def _micro_batches(run: Run, indices: List[List[int]], stream) -> List[Dict]:
    isolated = run.config.model.packed_attention == "isolated"
    device = distributed.device()
    names = blend_names(run.info.prefixes)
    batches = [flatten_micro_batch([stream[i] for i in micro], isolated, device, names,
                                   run.config.data.turn_exponent())
               for micro in indices]
    return context_parallel.split_micro_batches(batches, context_parallel.layout(
        run.config.parallel))


def _run_schedule(run: Run, batches: List[Dict], forward_only: bool,
                  forward_step: Optional[Callable] = None):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    # b*s: the flattened micro-batch (megatron-core divides it by CP for the pipeline's
    # activations: pass the whole padded length, cp_size x this rank's part)
    seq = batches[0]["tokens"].shape[1] * batches[0].get("cp_size", 1)
    return get_forward_backward_func()(
        forward_step_func=forward_step or run.forward_step,
        data_iterator=[iter(batches) for _ in run.model] if len(run.model) > 1 else iter(batches),
        model=run.model, num_microbatches=len(batches), seq_length=int(seq), micro_batch_size=1,
        forward_only=forward_only)


def _reduce_reports(store: List[Dict], batches: List[Dict], extra: Sequence[str] = ()
                    ) -> Dict[str, float]:
    """A step's metrics (module docstring) from the loss reports of this rank's micro-batches
    (``store``, on the last pipeline stage) and the ``batches`` read: ``STEP_TOTALS`` (and the
    sums and counts of the ``extra`` reports: ``turn_metrics``) summed here, then over the
    data-parallel ranks; a report without a count is NaN."""
    from megatron.core import parallel_state as ps

    totals = dict.fromkeys(STEP_TOTALS, 0.0)
    totals.update(dict.fromkeys((f"{name} {part}" for name in extra
                                 for part in ("sum", "count")), 0.0))
    for report in store:
        for name in (*LOSS_REPORTS, *extra):
            if name in report:
                total, count = report[name].detach().double().cpu().tolist()
                totals[f"{name} sum"] += total
                totals[f"{name} count"] += count
    if ps.get_context_parallel_rank() == 0:  # the context-parallel ranks read the same packs
        totals["num_tokens"] = float(sum(b["num_tokens"] for b in batches))
        totals["packs"] = float(sum(b["packs"] for b in batches))
    # loss sums and counts are split over context-parallel ranks too (context_parallel)
    totals = _all_reduce_sums(totals, ps.get_data_parallel_group(with_context_parallel=True))
    metrics = {name: totals[f"{name} sum"] / totals[f"{name} count"]
               if totals[f"{name} count"] > 0 else float("nan") for name in LOSS_REPORTS}
    for name in extra:
        count = totals[f"{name} count"]
        metrics[name] = totals[f"{name} sum"] / count if count > 0 else float("nan")
        group, _, part = name.rpartition(": ")
        if part in COUNT_NAMES:  # its count: the group's (or all, "turns") turns, tokens, ...
            metrics[f"{group}: {COUNT_NAMES[part]}" if group else COUNT_NAMES[part]] = count
    metrics.update(turn_num=totals["loss per turn count"],
                   num_loss_tokens=totals["loss per token count"],
                   num_tokens=totals["num_tokens"], packs=totals["packs"])
    return metrics


def _all_reduce_sums(values: Dict[str, float], group) -> Dict[str, float]:
    """``values`` summed over the ranks of ``group``: one float64 all-reduce, the keys in the
    order given (the same on every rank)."""
    vector = torch.tensor(list(values.values()), dtype=torch.float64, device=distributed.device())
    torch.distributed.all_reduce(vector, group=group)
    return dict(zip(values, vector.cpu().tolist()))


def _is_last_stage() -> bool:
    from megatron.core import parallel_state as ps

    return ps.is_pipeline_last_stage(ignore_virtual=True)


def _check_finite(run: Run, metrics: Optional[Dict[str, float]], grad_norm) -> None:
    """Stop every rank together if the loss or the gradient norm is NaN/Inf."""
    bad_loss = metrics is not None and not math.isfinite(metrics["loss per token"])
    flag = torch.tensor([1.0 if bad_loss else 0.0], device=distributed.device())
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    if flag.item() > 0:
        raise TrainingError(f"iteration {run.iteration}: the loss is NaN or Inf; lower --lr, "
                            "raise --lr-warmup-iters or check the data (tools/inspect_dialog_"
                            "dataset.py --verify); the last checkpoint is unaffected")
    if grad_norm is not None and not math.isfinite(float(grad_norm)):
        raise TrainingError(f"iteration {run.iteration}: the gradient norm is {grad_norm}; lower "
                            "--lr or use --clip-grad; the last checkpoint is unaffected")


def train_step(run: Run) -> Optional[Dict[str, float]]:
    """One optimizer step over the next global batch; metrics on the last stage, else None."""
    from megatron.core import parallel_state as ps

    indices = step_sample_indices(run.consumed, run.global_batch, run.config.data.micro_batch_size,
                                  run.dp_size, ps.get_data_parallel_rank())
    batches = _micro_batches(run, indices, run.train_stream)
    for chunk in run.model:
        chunk.zero_grad_buffer()
    run.optimizer.zero_grad()
    if run.config.model.moe_settings().get("moe_aux_loss_coeff"):
        _set_aux_loss_scale(run, batches)
    if run.config.data.loss_normalization == "power":
        _set_power_scale(batches)
    store = _run_schedule(run, batches, forward_only=False)
    lr = run.optimizer.param_groups[0]["lr"]
    updated, grad_norm, _ = run.optimizer.step()
    run.optimizer.zero_grad()  # param.grad aliases main_grad: clear it or the next step doubles
    run.iteration += 1
    run.consumed += run.global_batch
    extra = _power_reports(run, blend_names(run.info.prefixes))
    metrics = _reduce_reports(store, batches, extra) if _is_last_stage() else None
    _check_finite(run, metrics, grad_norm)
    if updated:  # an --fp16 step skipped for overflow leaves the schedule where it was
        run.scheduler.step(increment=1)
    if metrics is not None:
        metrics.update(grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                       lr=lr, skipped=0.0 if updated else 1.0)
        if run.config.optim.fp16:
            metrics["loss_scale"] = float(run.optimizer.get_loss_scale())
    return metrics


def _set_aux_loss_scale(run: Run, batches: List[Dict]) -> None:
    """The MoE load-balancing loss's weight for this step (``moe`` module docstring): the
    global loss count over the global routed tokens, both summed over data-parallel ranks."""
    from megatron.core import parallel_state as ps

    from mt_dialog.training import moe

    count, tokens = moe.step_count_and_tokens(batches, run.config.data.loss_normalization)
    totals = _all_reduce_sums({"count": count, "tokens": tokens},
                              ps.get_data_parallel_group(with_context_parallel=True))
    moe.set_aux_loss_scale(totals["count"], totals["tokens"])


def _set_power_scale(batches: List[Dict]) -> None:
    """--loss-normalization power: the step's scale ``turns / sum_turns L^(1-p)`` of the global
    batch (``loss`` module docstring), both summed over data x context parallel ranks (each
    turn's term sits on one position, so the context-parallel parts add up exactly)."""
    from megatron.core import parallel_state as ps

    from mt_dialog.training.loss import power_totals, set_power_scale

    turns, power = power_totals(batches)
    totals = _all_reduce_sums({"turns": turns, "power": power},
                              ps.get_data_parallel_group(with_context_parallel=True))
    set_power_scale(batches, round(totals["turns"]), totals["power"])


def _power_reports(run: Run, names: Sequence[str]) -> List[str]:
    """The ``extra`` reports of ``_reduce_reports`` besides the turn metrics: the power
    normalization's loss (with --loss-normalization power) and each blend dataset's."""
    normalization = run.config.data.loss_normalization
    power = [POWER_REPORT] if normalization == "power" else []
    return [*power, *dataset_report_names(names, normalization)]


def evaluate(run: Run) -> Optional[Dict[str, float]]:
    """Loss over the validation packs (all of them, or --eval-iters x global batch), exact sums:
    data-parallel rank r takes packs r, r + DP, ..., one pack per micro-batch. With
    ``run.eval_forward_step`` also loss, greedy accuracy and exact turns by reply length and
    turn index (``turn_metrics``)."""
    from megatron.core import parallel_state as ps

    finish_param_gather(run.model)  # --overlap-param-gather: the updated weights, not stale ones
    packs = [(d, i) for d, dataset in enumerate(run.valid_sets) for i in range(len(dataset))]
    if run.config.train.eval_iters:
        packs = packs[: run.config.train.eval_iters * run.global_batch]
    mine = [(pack, False) for pack in packs[ps.get_data_parallel_rank():: run.dp_size]]
    if run.config.parallel.expert_model_parallel_size > 1 and packs:  # as many as the others
        mine += [(packs[0], True)] * (-(-len(packs) // run.dp_size) - len(mine))
    for chunk in run.model:
        chunk.eval()
    isolated = run.config.model.packed_attention == "isolated"
    names = blend_names(run.info.valid_prefixes)
    batches = []
    for (d, i), filler in mine:
        sample = {**run.valid_sets[d][i], "dataset": d}
        batch = flatten_micro_batch([_untrained_copy(sample) if filler else sample], isolated,
                                    distributed.device(), names, run.config.data.turn_exponent())
        if filler:
            batch.update(num_tokens=0, packs=0)
        batch["vocab_size"] = run.info.vocab_size  # greedy accuracy chooses among the real ids
        batches.append(batch)
    batches = context_parallel.split_micro_batches(batches,
                                                   context_parallel.layout(run.config.parallel))
    with torch.no_grad():
        store = (_run_schedule(run, batches, True, run.eval_forward_step or run.forward_step)
                 if batches else [])
    for chunk in run.model:
        chunk.train()
    extra = report_names(run.config.train.eval_reply_length_buckets) \
        if run.eval_forward_step else []
    extra = [*extra, *_power_reports(run, names)]
    return _reduce_reports(store, batches, extra) if _is_last_stage() else None


def _untrained_copy(sample: Dict) -> Dict:
    """``sample`` with nothing trained (loss mask and turn lengths zero): validation's extra
    micro-batch for a data-parallel rank that holds one pack fewer than the others when experts
    are split over the data-parallel ranks (``--expert-model-parallel-size`` > 1), whose token
    dispatch in every MoE layer is a collective that every rank of the expert group must join
    as often as the others; it adds nothing to any sum or count (its tokens and pack too)."""
    return {**sample, "loss_mask": np.zeros_like(sample["loss_mask"]),
            "loss_token_num": np.zeros_like(sample["loss_token_num"]),
            "turn_num": np.int64(0)}


def _log_line(run: Run, window: List[Dict[str, float]], seconds: float) -> str:
    turn_num = sum(m["turn_num"] for m in window)
    loss_turn = sum(m["loss per turn"] * m["turn_num"] for m in window) / max(turn_num, 1)
    loss_tokens = sum(m["num_loss_tokens"] for m in window)
    loss_token = (sum(m["loss per token"] * m["num_loss_tokens"] for m in window)
                  / max(loss_tokens, 1))
    real = sum(m["num_tokens"] for m in window)
    slots = sum(m["packs"] for m in window) * run.info.seq_length
    last = window[-1]
    line = (f"iter {run.iteration:>6}/{run.train_iters} | loss/turn {loss_turn:.4f} | "
            f"loss/token {loss_token:.4f} | lr {last['lr']:.3e} | grad norm {last['grad_norm']:.3f}"
            f" | turns {int(turn_num)} | tokens/s {real / max(seconds, 1e-9):,.0f} | "
            f"padding {1 - real / max(slots, 1):.1%}")
    line += _power_loss(run, window)
    if run.config.optim.fp16:
        skipped = int(sum(m["skipped"] for m in window))
        line += f" | loss scale {last['loss_scale']:.1f} | skipped (overflow) {skipped}"
    return line + _by_dataset(run, window, run.info.prefixes)


def _power_loss(run: Run, window: List[Dict[str, float]]) -> str:
    """`` | loss (power 0.5) 1.2345`` with --loss-normalization power: the window's
    ``sum l / L^p`` over its ``sum_turns L^(1-p)`` (the loss it trains on); '' otherwise."""
    if run.config.data.loss_normalization != "power":
        return ""
    weight = sum(m.get("power turns", 0.0) for m in window)
    total = sum(m[POWER_REPORT] * m["power turns"] for m in window if m.get("power turns", 0.0))
    shown = f"{total / weight:.4f}" if weight > 0 else "-"
    return f" | loss (power {run.config.data.turn_exponent():g}) {shown}"


def _by_dataset(run: Run, window: List[Dict[str, float]], prefixes: Sequence[str]) -> str:
    """`` | loss/turn by dataset: text 2.3104, chat 1.0231`` for a blend: each dataset's loss
    under the run's normalization over the ``window`` of metrics (its sums over the window's
    steps divided by its counts; "-" for a dataset that no step of the window read)."""
    names = blend_names(prefixes)
    if not names:
        return ""
    report = REPORT_OF[run.config.data.loss_normalization]
    shown = []
    for name in names:
        key, count = f"dataset {name}: {report}", f"dataset {name}: {COUNT_NAMES[report]}"
        total = sum(m.get(count, 0.0) for m in window)
        value = sum(m[key] * m[count] for m in window if m.get(count, 0.0) > 0)
        shown.append(f"{name} {value / total:.4f}" if total > 0 else f"{name} -")
    return f" | {report.replace('loss per ', 'loss/')} by dataset: {', '.join(shown)}"


def _router_load(run: Run) -> str:
    """MoE models: the log line's router load over the interval (``moe.load_summary``: busiest
    and idlest expert's tokens over an even share, averaged over layers), also sent to the
    tracker; '' for a dense model. Collective over every rank."""
    from mt_dialog.training import moe

    load = moe.take_router_load(run.model)
    summary = moe.load_summary(load) if load else {}
    if not summary or not distributed.is_logging_rank():
        return ""
    if run.writer is not None:
        run.writer.log("train", summary, run.iteration)
    if run.history and run.history[-1]["iteration"] == run.iteration:
        run.history[-1].update(summary)  # the interval's last training row
    return (f" | experts max/mean {summary['router load max']:.2f} min/mean "
            f"{summary['router load min']:.2f}")


def _record(run: Run, prefix: str, metrics: Dict[str, float]) -> None:
    row = {"iteration": run.iteration, "split": prefix, **metrics}
    run.history.append(row)
    if run.writer is not None:  # a tracking.Tracker: TensorBoard and/or W&B
        run.writer.log(prefix, metrics, run.iteration)


def _save(run: Run) -> None:
    finish_param_gather(run.model)  # --overlap-param-gather: save the updated weights
    if distributed.is_logging_rank():
        warning = bundle_tokenizer(run.config.train.save, run.info.tokenizer)
        if warning:
            print(warning, flush=True)
    lora = {}
    if run.config.lora.enabled:  # the adapters and a pointer to the base
        from mt_dialog.training.lora import is_adapter_key

        lora = {"select": is_adapter_key, "common": {"lora_base": run.lora_base}}
    path = save_checkpoint(run.config.train.save, run.iteration, run.consumed, run.model,
                           run.optimizer, run.scheduler, to_dict(run.config), **lora,
                           record=_run_record(run))
    distributed.log(f"saved checkpoint {path}")


def _evaluate_and_log(run: Run) -> None:
    metrics = evaluate(run)
    if metrics is not None and distributed.is_logging_rank():
        _record(run, "valid", metrics)
        line = (f"validation at iter {run.iteration} | loss/turn {metrics['loss per turn']:.4f} "
                f"| loss/token {metrics['loss per token']:.4f} | turns {int(metrics['turn_num'])}"
                + _power_loss(run, [metrics])
                + _by_dataset(run, [metrics], run.info.valid_prefixes))
        if "accuracy" in metrics:
            line += f" | accuracy {metrics['accuracy']:.2%} | exact turns " \
                    f"{metrics['exact turns']:.2%}\n" + metrics_table(
                        metrics, run.config.train.eval_reply_length_buckets)
            if run.config.train.save:
                write_metrics(run.config.train.save, run.iteration, metrics,
                              run.config.train.eval_reply_length_buckets)
        print(line, flush=True)


def _validation_due(run: Run, last: bool) -> bool:
    """Every --eval-interval iterations; with --eval-iters alone, once at the end of the run
    (``last``: --train-iters reached, or stopping early: ``stopping.StopConditions``)."""
    cfg = run.config.train
    if not run.valid_sets:
        return False
    if cfg.eval_interval:
        return run.iteration % cfg.eval_interval == 0
    return bool(cfg.eval_iters) and last


def train(run: Run, stops: StopConditions) -> None:
    """The loop: step, log each interval, evaluate, save; stop at --train-iters or when
    ``stops`` says so (a checkpoint is saved at the stop with --save)."""
    cfg = run.config.train
    window, start = [], time.time()
    while run.iteration < run.train_iters:
        metrics = train_step(run)
        stop = stops.reason(run.iteration) if run.iteration < run.train_iters else None
        last = stop is not None or run.iteration == run.train_iters
        if metrics is not None and distributed.is_logging_rank():
            _record(run, "train", metrics)
            window.append(metrics)
        if run.iteration % cfg.log_interval == 0 or last:
            load = _router_load(run)  # collective: every rank
            if window:
                print(_log_line(run, window, time.time() - start) + load, flush=True)
            window, start = [], time.time()
        if _validation_due(run, last):
            _evaluate_and_log(run)
        if cfg.save and cfg.save_interval and run.iteration % cfg.save_interval == 0:
            _save(run)
        if stop:
            break
    if cfg.save and not (cfg.save_interval and run.iteration % cfg.save_interval == 0):
        _save(run)
    finish_param_gather(run.model)  # the returned run's model holds the last step's weights
    if run.iteration < run.train_iters:
        distributed.log(f"exiting at iteration {run.iteration} of {run.train_iters} ({stop}); "
                        + (f"continue with --load {cfg.save}" if cfg.save
                           else "nothing saved (no --save)"))


def check_before_build(config: DialogTrainingConfig, world_size: int):
    """Every check that needs no model, so that a bad set-up fails in seconds with one line:
    the parallel layout, the datasets, the schedule, the precision, the tokenizer flags, the
    validation data, the tracking packages, the checkpoint's architecture, and every dataset
    file (``open_datasets``). Returns ``(data-parallel size, DataInfo, datasets, StartPoint)``;
    raises ValueError (CheckpointError and DatasetFormatError included)."""
    from mt_dialog.training.fp8 import check as check_fp8
    from mt_dialog.training.megatron_flags import check_tokenizer, check_validation_data
    from mt_dialog.training.tracking import check_available

    dp_size = validate_world(config, world_size)
    info = inspect_datasets(config)
    validate_schedule(config, dp_size, info.seq_length, info.valid_packs)
    check_fp8(config, info.seq_length)  # --fp8-format / --tp-comm-overlap at the datasets' length
    check_precision(config)
    check_tokenizer(config)
    check_validation_data(config)
    check_available(config.train)
    check_save_folder(config.train)
    start = start_point(config.train)
    from mt_dialog.training.lora_checkpoint import check_lora_start

    check_lora_start(start, config)
    if start.path:
        check_model_matches(start.path, config.model)
    if start.path and not start.weights_only:
        if is_weights_only(start.path):
            raise CheckpointError(f"--load {start.path}: the checkpoint holds weights only "
                                  "(converted from Hugging Face, or exported); add --finetune "
                                  "to start from it, or pass it as --pretrained-checkpoint")
        check_resume_matches(start.path, config)
    return dp_size, info, open_datasets(config, info), start


def pretrain(config: DialogTrainingConfig, forward_step: Callable, argv=None,
             eval_forward_step: Optional[Callable] = None) -> Run:
    """Check, build, (load), train; returns the finished run (its ``history`` on the logging
    rank holds every logged metric). ``forward_step``: megatron's ``forward_step_func`` of
    training; ``eval_forward_step`` that of validation (None: ``forward_step``'s losses only).
    A SIGTERM under --exit-signal-handler is held from the moment the checks passed: the run
    stops after its first (or current) iteration."""
    started = time.time()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    dp_size, info, datasets, start = check_before_build(config, world_size)
    with StopConditions(config.train, started) as stops:
        run = _build_and_load(config, info, datasets, start, forward_step, dp_size)
        run.eval_forward_step, run.argv = eval_forward_step, argv
        if run.iteration >= run.train_iters:
            distributed.log(f"the run is finished: --load {start.path} is at iteration "
                            f"{run.iteration} of --train-iters {run.train_iters}; nothing to do "
                            "(raise --train-iters to train on)")
            return run
        run.writer = open_tracker(config)
        distributed.log(_banner(run, argv))
        edges = config.train.eval_reply_length_buckets
        if eval_forward_step and edges[-1] >= info.seq_length:
            distributed.log(f"note: --eval-reply-length-buckets {' '.join(map(str, edges))}: "
                            f"replies are at most --seq-length {info.seq_length} tokens, so the "
                            "buckets above it stay empty")
        if info.valid_packs and not (config.train.eval_interval or config.train.eval_iters):
            distributed.log(f"note: no validation (the validation split has {info.valid_packs} "
                            "packs): --eval-interval N validates every N iterations, "
                            "--eval-iters N once at the end")
        train(run, stops)
    if config.train.save and distributed.is_logging_rank():
        _write_config(run)
    if run.writer is not None:
        run.writer.close()
    return run


def _build_and_load(config: DialogTrainingConfig, info: DataInfo, datasets,
                    start: StartPoint, forward_step, dp_size: int) -> Run:
    par = config.parallel
    distributed.initialize(par.tensor_model_parallel_size, par.pipeline_model_parallel_size,
                           par.virtual_pipeline_model_parallel_size, config.train.seed,
                           par.expert_model_parallel_size, par.context_parallel_size)
    run = _setup(config, info, datasets, start, forward_step, dp_size)
    if start.note:
        distributed.log(start.note)
    if start.path and config.lora.enabled:
        from mt_dialog.training.lora_checkpoint import load_lora_start

        run.iteration, run.consumed, run.lora_base = load_lora_start(
            start, run.model, run.optimizer, run.scheduler)
        distributed.log(f"loaded {start.path} at iteration {run.iteration}; base "
                        f"{run.lora_base['path']} (iteration {run.lora_base['iteration']}, "
                        "frozen)")
    elif start.path:
        run.iteration, run.consumed = load_checkpoint(
            start.path, run.model, run.optimizer, run.scheduler, start.weights_only)
        distributed.log(f"loaded {start.path} at iteration {run.iteration}"
                        + (" (weights only)" if start.weights_only else ""))
    run.start_iteration = run.iteration
    return run


def _banner(run: Run, argv) -> str:
    """The start-up line (collective: it counts the parameters over the model-parallel ranks)."""
    from mt_dialog.training.lora import parameter_counts

    par, lora = run.config.parallel, run.config.lora
    trainable, total = parameter_counts(run.model)
    untouched = " (experts not adapted)" if run.config.model.num_experts else ""
    what = (f"LoRA rank {lora.lora_rank} alpha {lora.alpha:g} on {','.join(lora.targets)}"
            f"{untouched}: " if lora.enabled else "")
    experts = (f" EP={par.expert_model_parallel_size} | MoE {run.config.model.num_experts} "
               f"experts, top {run.config.model.moe_router_topk}"
               if run.config.model.num_experts else "")
    experts += " | overlapped: grad reduce" if par.overlap_grad_reduce else ""
    experts += ", param gather" if par.overlap_param_gather else ""
    cp = ""
    if par.context_parallel_size > 1:
        from mt_dialog.training.model import use_transformer_engine

        how = par.cp_comm_type if use_transformer_engine(run.config.model.transformer_impl) \
            else "local attention: all-gather"
        cp = f" CP={par.context_parallel_size} ({how})"
    power = (f" (p = {run.config.data.turn_exponent():g})"
             if run.config.data.loss_normalization == "power" else "")
    return (f"mt_dialog: TP={par.tensor_model_parallel_size} PP={par.pipeline_model_parallel_size}"
            f" DP={run.dp_size}{cp}{experts} | {run.train_iters} iterations x {run.global_batch} packs of "
            f"{run.info.seq_length} tokens | {len(run.train_stream)} training packs | loss "
            f"normalization {run.config.data.loss_normalization}{power} | {what}trainable "
            f"parameters "
            f"{trainable:,} of {total:,} ({trainable / max(total, 1):.2%}) | device "
            f"{distributed.device()}")


def _run_record(run: Run) -> Dict[str, Any]:
    source = source_info(run.start.path) if run.start and run.start.path else {}
    return run_record(run.argv, to_dict(run.config), to_dict(run.info), source)


def _write_config(run: Run) -> None:
    record = _run_record(run)
    write_run_record(run.config.train.save, record["command"], record["config"], record["data"],
                     record["source"])
