"""Fine-tune a pretrained Transformers model.  Usage: python train.py --task qa [options]

Reads top to bottom: settings -> setup -> train_step -> evaluate and save -> the training loop -> main.
"""
import os

# Tensors of 2 MB and more on transparent huge pages: a training step frees and allocates gigabytes
# of activations, and with 4 KB pages the freed memory fragments (SmolLM2 at 8 x 256 tokens with
# gradient checkpointing: 3.8 GB peak RSS instead of 3.4 GB). Read once, when torch first allocates.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import contextlib
import json
import logging
import math
import random
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from clm.task import CLMSettings, CLMTask
from data import DataSettings
from data.batching import TrainBatches, prefetched, step_plan, without_needless_mask
from engine.checkpoint import BEST, LATEST, load_saved_run, output_directory_lock, save_checkpoint, verified_checkpoint
from engine.device import (DeviceSettings, OutOfMemory, autocast, autocast_for_pass, configure_device, forked_rng,
                           grad_scaler, host_values, memory_mb, out_of_memory_as_error, peak_flops, peak_memory_mb,
                           pick_precision, pinned, restore_rng_state, rng_state, to_device)
from engine.distributed import (clip_grad_norm, close_processes, from_main, full_model_state, gather_to_main,
                                gradient_sync, held_state_mb, init_processes, is_distributed, is_main, is_sharded,
                                load_optimizer_state, optimizer_state, rank, sum_over_ranks, targets_over_ranks,
                                unwrap, world_size, wrap_model)
from engine.errors import UserError, run_cli
from engine.files import atomic_write_text
from engine.optim import OptimizerSettings, auto_learning_rate, auto_warmup_ratio, build_optimizer, linear_warmup_decay
from engine.planning import (Projection, StepTime, compile_pays, describe_dry_run, evaluations_to_come, fit_verdict,
                             mfu, planned_step_flops, project)
from engine.settings import HPARAM, TRAJECTORY, as_saved, changed_trajectory, parse, setting, with_role, write_config
from engine.signals import StopRequest
from engine.storage import (RESUME_AUTO, Storage, all_gathered, from_main_to_writers, once_per_node, output_storage,
                            resume_point)
from engine.task import Task
from engine.tensorboard import run_writer, write_hparams
from models.backbones import count_parameters, resolve_model
from models.build import ModelSettings, compile_gain, compile_in_place, export_merged, load_for_training, place
from models.flops import SequenceFlops, sequence_flops
from models.transfer import is_lora, layer_rate_scales, transformer_blocks
from qa.task import QASettings, QATask

log = logging.getLogger("train")

TASKS: dict[str, type[Task]] = {"qa": QATask, "clm": CLMTask}
RESULTS = "results.json"


def by_task(name: str) -> str:
    """A flag's default for each task, for its help."""
    return ", ".join(f"{task.DEFAULTS[name]} for {task_name}" for task_name, task in TASKS.items())


@dataclass(frozen=True)
class TrainSettings(ModelSettings, DataSettings, QASettings, CLMSettings, OptimizerSettings, DeviceSettings):
    """the run"""

    config: Path | None = setting(None, "YAML (or .json) file of flags (learning_rate: 3e-4); the command line "
                                        "overrides it. Every run writes OUTPUT_DIR/config.yaml, which repeats it",
                                  recorded=False)
    task: str = setting("qa", "qa: question answering on SQuAD-format data; clm: causal language modelling on plain "
                              "text", choices=tuple(TASKS), roles=(TRAJECTORY, HPARAM))
    output_dir: str | None = setting(None, "checkpoints (best/, latest/), results, TensorBoard logs; default "
                                           "outputs/TASK")
    epochs: int = setting(3, "passes over the training windows", at_least=1, roles=(TRAJECTORY, HPARAM))
    max_steps: int | None = setting(None, "stop after this many optimizer steps (overrides --epochs)", at_least=1,
                                    roles=(TRAJECTORY, HPARAM))
    batch_size: int | None = setting(None, "windows (qa) or blocks (clm) per micro-batch, per process; default "
                                           f"{by_task('batch_size')}", at_least=1)
    grad_accum_steps: int = setting(1, "micro-batches per optimizer step; the global batch is batch size x this x "
                                       "processes", at_least=1)
    seed: int = setting(42, "seed for initialisation, dropout and data order", roles=(TRAJECTORY, HPARAM))
    seeds: tuple[str, ...] = setting((), "run the same recipe once per seed (comma-separated: 1,2,3,4,5), each with "
                                         "--seed N into OUTPUT_DIR/seed-N, then write OUTPUT_DIR/seeds.json with each "
                                         "score's mean, minimum, maximum and standard deviation: one run measures "
                                         "its seed as much as its recipe", recorded=False)
    max_bad_steps: int = setting(5, "a step whose loss or gradients are not finite is skipped (no update); stop "
                                    "after this many in a row", at_least=1)
    eval_steps: int | None = setting(None, "also evaluate every N optimizer steps (always at each epoch end)",
                                     at_least=1)
    eval_batch_size: int | None = setting(None, f"windows or blocks per evaluation batch; default "
                                                f"{by_task('eval_batch_size')}", at_least=1)
    eval_before_training: bool | None = setting(
        None, "score the model once before training, as a baseline; default: yes, unless it has a fresh, untrained "
              "span head (extractive QA from a backbone), which would score about nothing")
    save_steps: int = setting(200, "also save the latest checkpoint every N optimizer steps", at_least=1)
    log_steps: int = setting(10, "TensorBoard logging interval in optimizer steps", at_least=1)
    resume: str | None = setting(None, "continue an interrupted run from checkpoint DIR, or from run directory DIR's "
                                       "latest/ (default: OUTPUT_DIR/latest); `auto`: from OUTPUT_DIR/latest if "
                                       "there is one, else start fresh, so that one command line serves the first "
                                       "start and every restart (torchrun --max-restarts)", bare=LATEST,
                                 recorded=False)
    fsdp: bool = setting(False, "under torchrun: shard weights, gradients and optimizer state across the processes "
                                "(FSDP2) instead of replicating the model in each (DDP)", roles=(TRAJECTORY,))
    early_stopping_patience: int | None = setting(
        None, "stop after N evaluations in a row that do not improve the task's metric (F1 for qa, validation loss for "
              "clm) by more than --early-stopping-min-delta; best/ holds the best", at_least=1, roles=(TRAJECTORY, HPARAM))
    early_stopping_min_delta: float = setting(0.0, "the least gain of the metric, in its own units (F1 points, loss), "
                                                   "that counts as an improvement for --early-stopping-patience",
                                              at_least=0, roles=(TRAJECTORY,))
    dry_run: bool = setting(
        False, "set up as usual, take three optimizer steps (the first on the run's longest windows, so that memory "
               "peaks as it will), then print and write OUTPUT_DIR/dry_run.json: parameters, peak memory, seconds per "
               "step, tokens/s, MFU, the projected time of the training and of its evaluations, and whether it fits. "
               "Writes no checkpoint", recorded=False)

    def __post_init__(self):
        super().__post_init__()
        if self.task == "clm" and (self.max_train_samples or self.max_eval_samples):
            raise UserError("--max-train-samples and --max-eval-samples count questions (--task qa); for clm, shorten "
                            "the text files")
        if self.compile and self.fsdp:
            raise UserError("--compile with --fsdp is not supported: use one or the other")
        if any(not seed.isdigit() for seed in self.seeds) or len(set(self.seeds)) < len(self.seeds):
            raise UserError(f"--seeds {','.join(self.seeds)}: give distinct whole numbers, e.g. --seeds 1,2,3")
        if self.early_stopping_min_delta and not self.early_stopping_patience:
            raise UserError("--early-stopping-min-delta needs --early-stopping-patience")


@dataclass(frozen=True)
class Resolved:
    """What setup decides from the settings and the machine: saved beside the settings (in results,
    checkpoints and config.yaml), never written into them."""

    learning_rate: float  # the flag's, or what `auto` chose for the model
    warmup_ratio: float  # the flag's, or what `auto` chose for the task
    global_batch: int = field(metadata={"roles": (TRAJECTORY, HPARAM),
                                        "label": "global batch (--batch-size x --grad-accum-steps x processes)"})


def parse_settings(argv=None) -> TrainSettings:
    """The command line (and --config file), with the defaults that depend on the task filled in."""
    settings = parse(TrainSettings, sys.argv[1:] if argv is None else argv, "Fine-tune a pretrained Transformers "
                     "model; see README.md.")
    task = TASKS[settings.task]
    unset = {name: value for name, value in task.DEFAULTS.items() if getattr(settings, name) is None}
    return replace(settings, model=settings.model or task.default_model(settings),
                   output_dir=settings.output_dir or f"outputs/{settings.task}", **unset)


@dataclass
class TrainingState:
    """Where the run is: saved with every checkpoint so that --resume continues exactly here."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0
    batches_done: int = 0  # global batches (optimizer steps) of this epoch already consumed
    best_score: float | None = None  # of the task's metric (F1 for QA), at the best evaluation so far
    best_step: int | None = None
    evaluations_without_improvement: int = 0  # in a row, for --early-stopping-patience
    stopped_early: dict | None = None  # {"step", "reason"} once --early-stopping-patience stopped the run
    last_eval_step: int = -1
    train_seconds: float = 0.0  # time in train_step, without evaluation and saving
    train_flops: float = 0.0  # model FLOPs of the steps taken (models/flops.py), on all processes
    eval_seconds: float = 0.0  # in evaluations
    windows_seen: int = 0
    tokens_seen: int = 0  # real tokens, padding excluded
    padded_tokens_seen: int = 0
    initial_scores: dict | None = None  # validation scores before training: the pretrained (zero-shot) baseline
    last_scores: dict | None = None  # of the latest evaluation
    skipped_steps: int = 0  # steps whose loss or gradients were not finite: their update was skipped
    bad_steps_in_a_row: int = 0


@dataclass
class Run:
    """Everything the loop needs, made by `setup` on this process's device."""

    settings: TrainSettings
    resolved: Resolved
    device: torch.device
    precision: str
    task: Task
    model: torch.nn.Module
    batches: TrainBatches
    total_steps: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    state: TrainingState
    output_dir: Path
    parameters: tuple[int, int]  # trainable, total
    eval_before_training: bool
    flops: SequenceFlops  # of the model's forward and training passes, by sequence length
    feature_flops: np.ndarray  # of training on each feature, forward and backward
    peak_flops: float | None  # of one process's device in the run's precision, for MFU (None: unknown)
    storage: Storage  # whether the nodes share the output directory, and which processes write checkpoints
    compile_note: str = ""  # what --compile auto decided, and why


def setup(settings: TrainSettings, device: torch.device) -> Run:
    """Tokenizer, data, model, optimizer and schedule, on this process's device; resumed from the
    checkpoint that --resume names, which is read here and nowhere else."""
    random.seed(settings.seed)
    np.random.seed(settings.seed)
    torch.manual_seed(settings.seed)  # the same on every process: a fresh head starts the same everywhere
    precision, precision_reason = pick_precision(settings.precision, device)
    configure_device(device)
    if settings.fsdp and precision == "fp16":
        raise UserError("--fsdp with --precision fp16 is not supported (its loss scaling would need the sharded "
                        "gradients' overflow checks): use bf16")
    output_dir = Path(settings.output_dir)
    storage = output_storage(output_dir)
    if world_size() > 1:
        log.info("%s", storage.describe(output_dir))
    resume_from = resume_point(settings.resume, output_dir, settings.task, storage)
    source = once_per_node(lambda: resolve_model(settings.model))
    with verified_checkpoint(resume_from, settings.task) if resume_from else contextlib.nullcontext():
        saved = load_saved_run(resume_from) if resume_from else None
        task = TASKS[settings.task](settings, source, saved.run_config if saved else None)
        model = load_for_training(settings, source, task.run_config["model_kind"], resume_from, task.run_config)
    untrained_head = getattr(model, "untrained_head", False)
    model, chosen = place(model, device, precision, settings.attention, bool(settings.compile))
    trainable, total = count_parameters(model)
    flops = sequence_flops(model)  # before DDP or FSDP wraps it: the same modules, which train the same
    feature_flops = flops.training(task.train_set.lengths, task.train_set.target_lengths)
    peak, peak_source = peak_flops(device, precision)
    learning_rate = settings.learning_rate
    if learning_rate is None:  # --learning-rate auto
        learning_rate = auto_learning_rate(settings.task, settings.lora, total)
    warmup_ratio = settings.warmup_ratio
    if warmup_ratio is None:  # --warmup-ratio auto
        warmup_ratio = auto_warmup_ratio(task.run_config["model_kind"])
    resolved = Resolved(learning_rate, warmup_ratio,
                        global_batch=settings.batch_size * settings.grad_accum_steps * world_size())
    model = wrap_model(model, device, settings.fsdp, transformer_blocks(model) if settings.fsdp else [],
                       model.get_base_model() if is_lora(model) else model)
    if world_size() > 1:
        torch.manual_seed(settings.seed + rank())  # each process its own dropout masks
    # One batch per optimizer step, drawn from the one seeded order whatever the process count.
    batches = TrainBatches(task.train_set.lengths, task.train_set.paragraph_ids, resolved.global_batch, settings.seed,
                           settings.group_by_length)
    total_steps = settings.max_steps or len(batches) * settings.epochs
    optimizer = build_optimizer(model, resolved.learning_rate, settings.weight_decay,
                                layer_rate_scales(unwrap(model), settings.layer_decay))
    scheduler = linear_warmup_decay(optimizer, int(resolved.warmup_ratio * total_steps), total_steps)
    scaler = grad_scaler(device, precision)
    state = TrainingState()
    if saved:
        changed = changed_trajectory(saved.training_state["args"], settings, resolved)
        if changed:
            raise UserError(f"{resume_from}: cannot resume with different settings ({'; '.join(changed)})")
        load_optimizer_state(model, optimizer, saved.training_state["optimizer"])
        scheduler.load_state_dict(saved.training_state["scheduler"])
        scaler.load_state_dict(saved.training_state["scaler"])
        # One random state per process (a single one before torchrun support); with another process
        # count each process keeps its fresh seed.
        rng_states = saved.training_state["rng"]
        rng_states = rng_states if isinstance(rng_states, list) else [rng_states]
        if len(rng_states) == world_size():
            restore_rng_state(rng_states[rank()], device)
        state = TrainingState(**saved.training_state["state"])
        log.info("resumed from %s at step %d (epoch %d)", resume_from, state.step, state.epoch + 1)
    # Once a resumed run has passed its check: a refused one leaves the directory as it was.
    if storage.writes() and not settings.dry_run:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_config(output_dir, settings, resolved)

    log.info("model %s: %.1fM parameters, %.2fM trainable (%.2f%%); device %s", settings.model, total / 1e6,
             trainable / 1e6, 100 * trainable / total, device)
    log.info("precision %s (%s); %s", precision, precision_reason, chosen)
    log.info("MFU against %s", f"{peak / 1e12:.3g} TFLOP/s ({peak_source})" if peak else f"nothing: {peak_source}")
    log.info("%s; %d optimizer steps of %d (global batch: %d per micro-batch x %d micro-batches x %d processes%s), "
             "lr %.0e, warmup %g of the steps", task.description, total_steps, resolved.global_batch, settings.batch_size,
             settings.grad_accum_steps, world_size(), ", FSDP" if settings.fsdp else "", resolved.learning_rate,
             resolved.warmup_ratio)
    eval_before_training = (settings.eval_before_training if settings.eval_before_training is not None
                            else not untrained_head)  # a fresh span head would score about nothing
    return Run(settings, resolved, device, precision, task, model, batches, total_steps, optimizer, scheduler, scaler,
               state, output_dir, (trainable, total), eval_before_training, flops, feature_flops, peak, storage)


OUT_OF_MEMORY_REMEDIES = ("lower --batch-size and raise --grad-accum-steps by as much (the same global batch), or "
                          "turn on --gradient-checkpointing, or train in --precision bf16 (or fp16); checkpoints "
                          "already written are intact")


@dataclass
class StepResult:
    loss: float  # per target, over the whole step on all processes
    grad_norm: float
    updated: bool  # False: a non-finite loss or gradients, and the step was skipped
    stop: bool  # some process was asked to stop (Ctrl-C, SIGTERM): all stop after this step


# Marks a micro-batch that only stands in for a process with no windows left in this step: it runs
# forward and backward (the processes must meet in the collectives) with its loss multiplied by 0.
STAND_IN = "stand_in"


def train_step(run, micro_batches: list[dict], max_grad_norm: float, stop_requested=lambda: False) -> StepResult:
    """One optimizer step over this process's micro-batches (its share of the step's batch, in
    length-sorted pieces). The summed loss is normalised by the targets (windows, or answer tokens)
    of the whole step on all processes, so every target weighs the same however the step was cut
    up and shared. Gradients are synchronised once, in the last backward pass.

    The host reads the device once, at the end: the loss, the gradient norm and whether any process
    was asked to stop (`stop_requested()`, asked as the step ends), together. Nothing is read per
    micro-batch, so on a GPU the host queues the whole step without waiting for it. The weights are
    updated unless the loss or the gradients are not finite (one NaN through AdamW would poison
    every weight); with fp16 that is also the grad scaler's overflow check (its unscaled gradients
    are then inf), and the scaler lowers its scale as it would have."""
    run.model.train()
    # Counted on the host, from the batches before they are copied: no read of the device.
    targets = targets_over_ranks(sum(run.task.count_targets(b) for b in micro_batches if STAND_IN not in b))
    processes = world_size()  # DDP and FSDP average gradients over the processes: undo that
    loss_sum = None
    for k, batch in enumerate(micro_batches):
        weight = 0 if STAND_IN in batch else 1
        batch = to_device({key: v for key, v in batch.items() if key != STAND_IN}, run.device)
        shape = " x ".join(map(str, batch["input_ids"].shape))
        with out_of_memory_as_error(run.device, f"training on a micro-batch of {shape} tokens", OUT_OF_MEMORY_REMEDIES):
            with gradient_sync(run.model, k == len(micro_batches) - 1):
                with autocast(run.device, run.precision):
                    micro_loss = run.task.loss(run.model, batch) * weight
                run.scaler.scale(micro_loss * processes / targets).backward()
        loss_sum = micro_loss.detach() if loss_sum is None else loss_sum + micro_loss.detach()
    step_sums = sum_over_ranks(torch.stack([loss_sum, torch.full_like(loss_sum, float(stop_requested()))]))
    run.scaler.unscale_(run.optimizer)
    grad_norm = clip_grad_norm(run.model, max_grad_norm)
    loss, grad_norm, stops = host_values(step_sums[0] / targets, grad_norm, step_sums[1])
    updated = math.isfinite(loss) and math.isfinite(grad_norm)  # the same on every process: both are global
    if updated:
        run.scaler.step(run.optimizer)
        run.scheduler.step()
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, grad_norm, updated, stops > 0)


def micro_batches_of_step(run: Run, batch: list[int]) -> tuple[list[dict], int]:
    """This process's collated micro-batches of one step's global batch (pinned when the device
    copies from pinned memory; without a mask when unpadded), and the padded tokens of all
    processes' micro-batches."""
    train_set = run.task.train_set
    plans = step_plan(batch, train_set.lengths, world_size(), run.settings.batch_size)
    micro_batches = [pinned(without_needless_mask(run.task.collate([train_set[i] for i in piece])), run.device) if piece else
                     {**run.task.collate([train_set[batch[0]]]), STAND_IN: True} for piece in plans[rank()]]
    padded = sum(len(piece) * max(int(train_set.lengths[i]) for i in piece)
                 for pieces in plans for piece in pieces if piece)
    return micro_batches, padded


def evaluate(run: Run) -> dict:
    """Score the model on the validation set; the task writes its outputs (predictions.json, or for the
    evaluation before training predictions_before_training.json)."""
    if is_main():
        run.output_dir.mkdir(parents=True, exist_ok=True)
    name = "predictions_before_training.json" if run.state.step == 0 else "predictions.json"
    batch_size = run.settings.eval_batch_size
    # Evaluation must leave the random stream alone (its DataLoader draws a seed from it): otherwise
    # how often a run evaluates would change its dropout masks, and so its result.
    with forked_rng(run.device), out_of_memory_as_error(run.device, f"evaluating batches of {batch_size}",
                                                        "lower --eval-batch-size"):
        scores = run.task.evaluate(unwrap(run.model), run.device, run.precision, batch_size, run.output_dir / name)
    # Each process answered a share; rank 0 scored them all, and every process acts on its scores.
    return from_main(scores)


def save(run: Run, name: str, with_training_state: bool, scores: dict | None = None) -> None:
    """Every process takes part (a sharded model and optimizer are gathered); rank 0 writes, and on
    node-local disks the first process of each other disk too (engine/storage.py)."""
    storage = run.storage
    model_state = full_model_state(run.model)
    if model_state is not None:  # gathered on rank 0 alone
        model_state = from_main_to_writers(model_state, storage)
    training_state = None
    if with_training_state:
        optimizer = optimizer_state(run.model, run.optimizer)
        if is_sharded(run.model):  # gathered on rank 0 alone
            optimizer = from_main_to_writers(optimizer, storage)
        training_state = {
            "optimizer": optimizer,
            "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(),
            "rng": (gather_to_main if storage.shared else all_gathered)(rng_state(run.device)),
            "state": asdict(run.state), "args": as_saved(run.settings, run.resolved),
        }
    if storage.writes():
        save_checkpoint(run.output_dir / name, unwrap(run.model), run.task.tokenizer,
                        {**run.task.run_config, "eval": scores}, training_state, model_state)


def evaluate_and_save(run: Run, writer) -> dict:
    scores = evaluate(run)
    state, task = run.state, run.task
    state.eval_seconds += scores["seconds"]
    state.last_eval_step, state.last_scores = state.step, scores
    for key in task.scalars:
        if key in scores:
            writer.add_scalar(f"eval/{key}", scores[key], state.step)
    log.info("step %d%s: %s (%.0fs)", state.step, " (before training)" if state.step == 0 else "",
             task.describe(scores), scores["seconds"])
    score = scores[task.metric]
    gain = None if state.best_score is None else (score - state.best_score) * (1 if task.higher_is_better else -1)
    if gain is None or gain > 0:
        state.best_score, state.best_step = score, state.step
        save(run, BEST, with_training_state=False, scores=scores)
    writer.add_scalar(f"best/{task.metric}", state.best_score, state.step)
    if state.step > 0 and run.settings.early_stopping_patience:  # the evaluation before training is the baseline
        count_patience(run, writer, gain)
    save(run, LATEST, with_training_state=True, scores=scores)
    return scores


def count_patience(run: Run, writer, gain: float | None) -> None:
    """--early-stopping-patience: count the evaluations in a row whose metric did not improve on the best
    by more than --early-stopping-min-delta, and mark the run stopped when there are as many as the
    patience. Every process counts from the same (rank 0's) scores, so all stop at the same step."""
    state, settings, metric = run.state, run.settings, run.task.metric
    if gain is None or gain > settings.early_stopping_min_delta:
        state.evaluations_without_improvement = 0
        return
    state.evaluations_without_improvement += 1
    if state.evaluations_without_improvement < settings.early_stopping_patience:
        return
    by = f" by more than {settings.early_stopping_min_delta:g}" if settings.early_stopping_min_delta else ""
    state.stopped_early = {"step": state.step, "reason": (
        f"{state.evaluations_without_improvement} evaluations in a row did not improve {metric}{by} "
        f"(best {state.best_score:.4g} at step {state.best_step}; --early-stopping-patience "
        f"{settings.early_stopping_patience})")}
    writer.add_scalar("train/stopped_early_at_step", state.step, state.step)
    log.info("early stop at step %d of %d: %s", state.step, run.total_steps, state.stopped_early["reason"])


def write_run_hparams(run: Run, writer, finished: bool = False) -> None:
    """The settings TensorBoard's HParams dashboard compares runs by, and the scalars it shows beside
    them: the task's metric (last and best), MFU, and the step an early stop came at."""
    saved = as_saved(run.settings, run.resolved)
    names = with_role(TrainSettings, HPARAM) + with_role(Resolved, HPARAM)
    settings = {**{name: saved[name] for name in names}, "precision": run.precision,
                "trainable_parameters": run.parameters[0], "total_parameters": run.parameters[1]}
    metric = run.task.metric
    write_hparams(writer, settings, [f"eval/{metric}", f"best/{metric}", "train/mfu", "train/stopped_early_at_step"],
                  finished)


def skipped_step(run: Run, writer, loss: float, grad_norm: float) -> None:
    """Count a step whose update was skipped; too many in a row stop the run, saving nothing new."""
    state = run.state
    state.skipped_steps += 1
    state.bad_steps_in_a_row += 1
    writer.add_scalar("train/skipped_steps", state.skipped_steps, state.step)
    if is_main():  # every process skipped the same step
        log.warning("step %d: loss %.4g, gradient norm %.4g: update skipped (%d in a row, %d in all)", state.step, loss,
                    grad_norm, state.bad_steps_in_a_row, state.skipped_steps)
    if state.bad_steps_in_a_row >= run.settings.max_bad_steps:
        writer.close()
        raise UserError(f"step {state.step}: {state.bad_steps_in_a_row} steps in a row had a non-finite loss or "
                        f"gradients (loss {loss:.4g}, gradient norm {grad_norm:.4g}); stopped, saving nothing new: lower "
                        f"--learning-rate, or train in another --precision (this run: {run.precision}; fp16 overflows "
                        "most easily)")


def train(run: Run) -> None:
    state, settings = run.state, run.settings
    writer = run_writer(run.output_dir / "tensorboard")
    trainable, total = run.parameters
    writer.add_text("model", f"{trainable:,} of {total:,} parameters trainable ({100 * trainable / total:.2f}%)", state.step)
    write_run_hparams(run, writer)
    bar = tqdm(total=run.total_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True,
               disable=not is_main())
    # Since the last log line: steps' seconds (each ends reading the device: synchronised), windows,
    # tokens, FLOPs.
    window = np.zeros(4)
    first_steps = []  # this process's first steps: --compile auto decides from their times
    lengths = run.task.train_set.lengths
    if state.step == 0 and state.initial_scores is None and run.eval_before_training:
        state.initial_scores = evaluate_and_save(run, writer)
    with StopRequest() as stop:
        while state.step < run.total_steps and not state.stopped_early:
            epoch_batches = run.batches.for_epoch(state.epoch)
            # The next step's micro-batches are collated (and pinned) while this step runs.
            steps = prefetched(epoch_batches[state.batches_done:], lambda b: micro_batches_of_step(run, b))
            started = time.perf_counter()
            for batch, (micro_batches, padded_tokens) in steps:
                step = train_step(run, micro_batches, settings.max_grad_norm, lambda: stop.requested)
                seconds = time.perf_counter() - started  # with any wait for the batch
                state.step += 1
                if step.updated:
                    state.bad_steps_in_a_row = 0
                else:
                    skipped_step(run, writer, step.loss, step.grad_norm)
                state.batches_done += 1
                # The epoch ends before this step's save, so that a run resumed from it starts the next
                # epoch, and its one evaluation serves both the epoch end and --eval-steps.
                epoch_end = state.batches_done == len(epoch_batches)
                if epoch_end:
                    state.epoch, state.batches_done = state.epoch + 1, 0
                tokens, flops = int(sum(lengths[i] for i in batch)), float(run.feature_flops[batch].sum())
                window += (seconds, len(batch), tokens, flops)
                state.train_seconds += seconds
                state.windows_seen += len(batch)
                state.tokens_seen += tokens
                state.padded_tokens_seen += padded_tokens
                state.train_flops += flops
                if settings.compile is None and len(first_steps) < COMPILE_DECISION_AFTER:
                    first_steps.append(StepTime(seconds, flops, tokens))
                    if len(first_steps) == COMPILE_DECISION_AFTER:
                        decide_compile(run, first_steps[1:])  # the first step warms up
                if state.step % settings.log_steps == 0 or state.step == run.total_steps:
                    log_window(run, writer, bar, step, *window)
                    window[:] = 0
                bar.update(1)
                if epoch_end or settings.eval_steps and state.step % settings.eval_steps == 0:
                    evaluate_and_save(run, writer)
                elif state.step % settings.save_steps == 0 or step.stop:
                    save(run, LATEST, with_training_state=True)
                if step.stop:
                    bar.close()
                    writer.close()
                    raise SystemExit(f"stopped at step {state.step}; continue with --resume" if is_main() else 1)
                if state.step >= run.total_steps or state.stopped_early:
                    break
                started = time.perf_counter()
    if state.last_eval_step != state.step:
        evaluate_and_save(run, writer)
    write_run_hparams(run, writer, finished=True)
    bar.close()
    writer.close()


def run_mfu(run: Run, flops: float, seconds: float) -> float | None:
    return mfu(flops, seconds, run.peak_flops, world_size())


def log_window(run: Run, writer, bar, step: StepResult, seconds: float, windows: float, tokens: float,
               flops: float) -> None:
    """TensorBoard's train/ scalars and the progress line, over the steps since the last log."""
    lr = run.scheduler.get_last_lr()[0]
    utilisation = run_mfu(run, flops, seconds)
    for name, value in (("loss", step.loss), ("lr", lr), ("grad_norm", step.grad_norm),
                        ("skipped_steps", run.state.skipped_steps), ("windows_per_s", windows / seconds),
                        ("tokens_per_s", tokens / seconds), ("mfu", utilisation)):
        if value is not None:
            writer.add_scalar(f"train/{name}", value, run.state.step)
    bar.set_postfix(loss=f"{step.loss:.3f}", lr=f"{lr:.1e}", win_s=f"{windows / seconds:.1f}",
                    mfu="?" if utilisation is None else f"{utilisation:.0%}")


def project_rest(run: Run, timed: list[StepTime], forward: StepTime | None = None) -> Projection:
    """The rest of the run (from its current step), projected from `timed` steps (and an evaluation's
    from a timed `forward` pass)."""
    state, settings, eval_set = run.state, run.settings, run.task.eval_set
    evaluates_first = state.step == 0 and state.initial_scores is None and run.eval_before_training
    remaining = planned_step_flops(run.feature_flops, run.batches, run.total_steps)[state.step:]
    return project(timed, float(remaining.sum()), len(remaining),
                   evaluations_to_come(state.step, run.total_steps, len(run.batches), settings.eval_steps,
                                       evaluates_first),
                   float(run.flops.forward(eval_set.lengths, eval_set.target_lengths).sum()), forward)


# --compile auto decides after this many steps, timing all but the first (which warms up).
COMPILE_DECISION_AFTER = 3


def compile_decision(run: Run, projection: Projection) -> tuple[bool, str, float]:
    """--compile auto: (compile now, why, the projected seconds of the training still to do, compiling
    included). Rank 0's projection decides for every process."""
    gain = "--fsdp does not combine with compile" if run.settings.fsdp else \
        compile_gain(run.device, run.precision, len(transformer_blocks(unwrap(run.model))))
    if isinstance(gain, str):
        return False, f"eager: {gain}", projection.train_seconds
    speedup, compile_seconds = gain
    pays, saved = compile_pays(projection.train_seconds, speedup, compile_seconds)
    compiling = from_main(pays)
    note = (f"{'compiled' if compiling else 'eager'} after step {run.state.step}: the remaining "
            f"{projection.train_seconds:.0f} s of training would gain about {saved:.0f} s at the {speedup}x measured on "
            f"{run.device.type} in {run.precision}, for about {compile_seconds:.0f} s of compiling")
    return compiling, note, projection.train_seconds - saved + compile_seconds if compiling else projection.train_seconds


def decide_compile(run: Run, timed: list[StepTime]) -> None:
    compiling, run.compile_note, _ = compile_decision(run, project_rest(run, timed))
    if compiling:
        compile_in_place(unwrap(run.model))
    log.info("--compile auto: %s", run.compile_note)


def write_results(run: Run, scores: dict, state_mb: list[float]) -> None:
    """OUTPUT_DIR/results.json: final scores, throughput and memory of the run."""
    state = run.state
    results = {
        "eval": scores, "initial_eval": state.initial_scores, f"best_checkpoint_{run.task.metric}": state.best_score,
        "steps": state.step, "skipped_steps": state.skipped_steps, "global_batch": run.resolved.global_batch,
        "processes": world_size(), "fsdp": run.settings.fsdp, "device": str(run.device),
        "precision": run.precision, "train_seconds": state.train_seconds, "train_windows": state.windows_seen,
        "train_windows_per_s": state.windows_seen / max(state.train_seconds, 1e-9),
        "train_tokens_per_s": state.tokens_seen / max(state.train_seconds, 1e-9),
        "train_flops": state.train_flops, "mfu": run_mfu(run, state.train_flops, state.train_seconds),
        "eval_seconds": state.eval_seconds,
        "compile": run.compile_note or ("compiled" if run.settings.compile else "eager"),
        "padding_share": 1 - state.tokens_seen / max(state.padded_tokens_seen, 1),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # of rank 0's process
        "state_mb_per_process": state_mb,
        "trainable_parameters": run.parameters[0], "total_parameters": run.parameters[1],
        "stopped_early": state.stopped_early, "args": as_saved(run.settings, run.resolved),
    }
    for count, name in (("windows", "windows"), ("total", "questions"), ("tokens", "tokens")):
        if count in scores:
            results[f"eval_{name}_per_s"] = scores[count] / scores["seconds"]
    peak_device_mb = peak_memory_mb(run.device)
    if peak_device_mb is not None:
        results["peak_cuda_mb"] = peak_device_mb
    atomic_write_text(run.output_dir / RESULTS, json.dumps(results, indent=2))


def leave_processes(run: Run) -> None:
    """The processes leave together. DDP's reducer holds the process group: the model goes first, or
    the group's teardown can deadlock."""
    run.model = None
    close_processes()


def finish(run: Run) -> None:
    """results.json (and the merged LoRA model); then the processes leave together."""
    scores = run.state.last_scores
    state_mb = gather_to_main(held_state_mb(run.model, run.optimizer))
    main_process = is_main()
    if main_process:
        write_results(run, scores, state_mb)
        if run.settings.merge_lora:
            export_merged(run.output_dir / BEST, run.output_dir / "merged", run.task.tokenizer)
            log.info("merged the LoRA adapter of %s into %s", run.output_dir / BEST, run.output_dir / "merged")
    leave_processes(run)
    if main_process:
        stopped = f"stopped early at step {run.state.stopped_early['step']}; " if run.state.stopped_early else ""
        print(f"final: {run.task.describe(scores)}; {stopped}best {run.task.metric} {run.state.best_score:.4g} "
              f"(step {run.state.best_step}), checkpoints in {run.output_dir}/best and {run.output_dir}/latest")


DRY_RUN = "dry_run.json"


def longest_features(run: Run, count: int) -> list[int]:
    """The `count` longest training features: the batches where memory peaks."""
    return np.argsort(-run.task.train_set.lengths, kind="stable")[:count].tolist()


def evaluation_probe(run: Run) -> StepTime:
    """Evaluation's largest forward pass, timed: --eval-batch-size of the longest training features
    (evaluation's windows or blocks are as long), without gradients, as evaluation runs, beside the
    optimizer state: where evaluation's memory peaks, and its forward FLOP rate."""
    train_set, size = run.task.train_set, run.settings.eval_batch_size
    longest = longest_features(run, size)
    batch = to_device(run.task.collate([train_set[i] for i in longest]), run.device)
    model = unwrap(run.model)
    model.eval()
    started = time.perf_counter()
    with out_of_memory_as_error(run.device, f"evaluating batches of {size}", "lower --eval-batch-size"):
        with torch.no_grad(), autocast_for_pass(model, run.device, run.precision):
            host_values(run.task.loss(model, batch))  # the read waits for the device
    return StepTime(time.perf_counter() - started, float(run.flops.forward(
        train_set.lengths[longest], None if train_set.target_lengths is None else train_set.target_lengths[longest]).sum()),
        int(train_set.lengths[longest].sum()))


def dry_run(run: Run) -> dict:
    """Three optimizer steps and one evaluation batch, nothing saved: the first step on the global batch
    of the longest features (every process's largest micro-batches, so memory peaks as in the run, and
    it warms up), then the run's own next two batches, timed, from which the rest of the run is
    projected, then evaluation's largest batch (`evaluation_probe`). The report goes to the log and to
    OUTPUT_DIR/dry_run.json (rank 0's; under torchrun every process runs its share)."""
    state, lengths = run.state, run.task.train_set.lengths
    longest = longest_features(run, run.resolved.global_batch)
    upcoming = run.batches.for_epoch(state.epoch)[state.batches_done:][:2]
    timed, forward, verdict = [], None, None
    try:
        for batch in [longest, *upcoming]:
            micro_batches, _ = micro_batches_of_step(run, batch)
            started = time.perf_counter()
            train_step(run, micro_batches, run.settings.max_grad_norm)
            timed.append(StepTime(time.perf_counter() - started, float(run.feature_flops[batch].sum()),
                                  int(lengths[batch].sum())))
        forward = evaluation_probe(run)
    except OutOfMemory as error:
        verdict = f"does not fit: {error}"
    report = {"model": run.settings.model, "device": str(run.device), "precision": run.precision,
              "processes": world_size(), "trainable_parameters": run.parameters[0], "parameters": run.parameters[1],
              **memory_mb(run.device)}
    if timed:
        projection = project_rest(run, timed[1:] or timed, forward)
        train_seconds, compile_note = projection.train_seconds, "compiled" if run.settings.compile else "eager"
        if run.settings.compile is None:  # as the run will decide after its first steps
            _, compile_note, train_seconds = compile_decision(run, projection)
        report.update(seconds_per_step=projection.seconds_per_step, tokens_per_s=projection.tokens_per_s,
                      mfu=run_mfu(run, projection.flops_per_s, 1.0), steps=projection.steps,
                      projected_train_seconds=train_seconds, compile=compile_note,
                      evaluations=projection.evaluations, projected_eval_seconds=projection.eval_seconds)
    verdict = verdict or fit_verdict(report)
    report.update(fits=verdict.startswith("fits"), verdict=verdict)
    if is_main():
        run.output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run.output_dir / DRY_RUN, json.dumps(report, indent=2))
    return report


SEEDS = "seeds.json"


def over_seeds(settings: TrainSettings) -> None:
    """--seeds: the run once per seed, each in OUTPUT_DIR/seed-N (with --resume auto, a restarted
    loop skips the finished ones), then the spread of every score over them."""
    output_dir = Path(settings.output_dir)
    for seed in settings.seeds:
        train_once(replace(settings, seeds=(), seed=int(seed), output_dir=str(output_dir / f"seed-{seed}")))
    if int(os.environ.get("RANK", "0")) != 0:  # the process groups are closed: torchrun's rank says who writes
        return
    results = {seed: json.loads((output_dir / f"seed-{seed}" / RESULTS).read_text())["eval"] for seed in settings.seeds}
    spread = {}
    for name in TASKS[settings.task].scalars:
        values = [scores[name] for scores in results.values() if scores.get(name) is not None]
        if len(values) == len(results):
            spread[name] = {"mean": statistics.mean(values), "min": min(values), "max": max(values),
                            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                            "by_seed": dict(zip(settings.seeds, values))}
    atomic_write_text(output_dir / SEEDS, json.dumps({"seeds": list(settings.seeds), "scores": spread}, indent=2))
    for name, score in spread.items():
        print(f"{name} over seeds {', '.join(settings.seeds)}: mean {score['mean']:.4g}, min {score['min']:.4g}, "
              f"max {score['max']:.4g}, std {score['std']:.3g}")
    print(f"per seed: {output_dir}/seed-N; summary: {output_dir / SEEDS}; side by side: tensorboard --logdir {output_dir}")


def main(argv=None) -> None:
    settings = parse_settings(argv)
    if settings.seeds and not settings.dry_run:
        over_seeds(settings)
    else:  # a dry run projects one run: every seed's takes as many steps of the same batches' sizes
        train_once(settings)


def train_once(settings: TrainSettings) -> None:
    device = init_processes(settings.device)  # under torchrun; plain `python train.py` has no process group
    if settings.fsdp and not is_distributed():
        raise UserError("--fsdp shards the model across processes: run train.py under torchrun "
                        "(torchrun --nproc_per_node N train.py --fsdp ...)")
    logging.basicConfig(level=logging.INFO if is_main() else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    import transformers

    transformers.logging.set_verbosity_error()  # our own log says what matters (e.g. a fresh head)
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # offline retries: our error line says it once
    output_dir = Path(settings.output_dir)
    with logging_redirect_tqdm(), output_directory_lock(output_dir) if is_main() else contextlib.nullcontext():
        run = setup(settings, device)
        if settings.dry_run:
            report, main_process = dry_run(run), is_main()  # asked while the process group stands
            leave_processes(run)
            if main_process:
                print(describe_dry_run(report, output_dir / DRY_RUN))
                if settings.seeds:
                    print(f"  --seeds {','.join(settings.seeds)}: {len(settings.seeds)} runs like this one, "
                          "one after another")
            if not report["fits"]:
                raise SystemExit(1)
            return
        # A run killed after its last checkpoint but before results.json is finished by --resume.
        if (run.state.step >= run.total_steps or run.state.stopped_early) and from_main((output_dir / RESULTS).is_file()):
            done = f"the run in {output_dir} already finished at step {run.state.step}" + (
                " (stopped early)" if run.state.stopped_early else "")
            if settings.resume != RESUME_AUTO:
                raise UserError(f"nothing to do: {done}")
            log.info("--resume auto: nothing to do: %s", done)
            leave_processes(run)
            return
        train(run)
        finish(run)


if __name__ == "__main__":
    run_cli(main)
