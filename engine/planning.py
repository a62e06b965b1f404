"""How long a run will take and how close to the hardware it runs: MFU, and the rest of a run
projected from a few timed steps (train.py's --dry-run and --compile auto).

A step's model FLOPs are known before it runs: models/flops.py counts each feature's, and the seeded
batches of every epoch are fixed. So the training still to do is its FLOPs at the FLOP rate of the
timed steps, however its batches differ in length; an evaluation is its forward FLOPs at that rate.
"""
from dataclasses import dataclass

import numpy as np


def mfu(flops: float, seconds: float, peak_flops: float | None, processes: int) -> float | None:
    """Model FLOPs utilisation: `flops` (of every process's steps) per second, over what the processes'
    devices can do at the run's precision (None where that is unknown)."""
    return flops / seconds / (peak_flops * processes) if peak_flops and seconds > 0 else None


@dataclass(frozen=True)
class StepTime:
    """A timed optimizer step: its seconds (ended by a read of the device, so synchronised), and the
    model FLOPs and tokens of its whole batch, every process's share."""

    seconds: float
    flops: float
    tokens: int


@dataclass(frozen=True)
class Projection:
    """The rest of a run, projected from timed steps by their model FLOPs."""

    seconds_per_step: float  # of the timed steps
    tokens_per_s: float
    flops_per_s: float
    steps: int  # still to take
    train_seconds: float
    evaluations: int  # still to make
    eval_seconds: float


def planned_step_flops(feature_flops: np.ndarray, batches, total_steps: int) -> np.ndarray:
    """The model FLOPs of every optimizer step of a run, step k at index k - 1: `batches.for_epoch(e)`
    gives epoch e's batches of feature indices (data/batching.py's TrainBatches)."""
    flops, epoch = [], 0
    while len(flops) < total_steps:
        flops += [float(feature_flops[batch].sum()) for batch in batches.for_epoch(epoch)]
        epoch += 1
    return np.array(flops[:total_steps])


def evaluations_to_come(step: int, total_steps: int, steps_per_epoch: int, eval_steps: int | None,
                        evaluates_first: bool) -> int:
    """How many evaluations a run at `step` still makes, as train.py decides them: one before training
    (`evaluates_first`), then one at each epoch's end, every `eval_steps`, and at the last step, once
    per step."""
    return int(evaluates_first) + sum(1 for s in range(step + 1, total_steps + 1)
                                      if s % steps_per_epoch == 0 or (eval_steps and s % eval_steps == 0)
                                      or s == total_steps)


def project(timed: list[StepTime], remaining_flops: float, remaining_steps: int, evaluations: int,
            eval_flops: float, forward: StepTime | None = None) -> Projection:
    """The training still to do (`remaining_flops`) at the FLOP rate of the `timed` steps, and each
    evaluation's forward FLOPs (`eval_flops`) at the rate of a timed `forward` pass (without one, at
    the training's). Generated answers, which wait on every token, take longer than their FLOPs say,
    and scoring the answers adds its own time."""
    seconds, flops, tokens = (sum(column) for column in zip(*((t.seconds, t.flops, t.tokens) for t in timed)))
    rate = flops / seconds
    eval_rate = forward.flops / forward.seconds if forward else rate
    return Projection(seconds / len(timed), tokens / seconds, rate, remaining_steps, remaining_flops / rate,
                      evaluations, evaluations * eval_flops / eval_rate)


def compile_pays(train_seconds: float, speedup: float, compile_seconds: float) -> tuple[bool, float]:
    """(whether compiling pays, the seconds it saves) for `train_seconds` of eager training, at a
    measured `speedup`, for `compile_seconds` of compiling."""
    saved = train_seconds * (1 - 1 / speedup)
    return saved > compile_seconds, saved


def fit_verdict(memory: dict) -> str:
    """"fits: ..." or "may not fit: ..." from engine/device.py's `memory_mb`: a peak above 90% of what
    the process could have is too close to call."""
    peak, available, measured = memory["peak_memory_mb"], memory.get("available_mb"), memory["measured"]
    if available is None or peak < 0.9 * available:
        of = f" of {available:,.0f} MB available" if available else ""
        return f"fits: peak {peak:,.0f} MB{of} ({measured})"
    return f"may not fit: a peak of {peak:,.0f} MB ({measured}), above 90% of the {available:,.0f} MB available"


def describe_dry_run(report: dict, path) -> str:
    """A dry run's report (dry_run.json, written to `path`) as the lines it prints."""
    lines = [f"dry run of {report['model']} on {report['device']} ({report['precision']}, {report['processes']} "
             f"process(es)): {report['trainable_parameters']:,} of {report['parameters']:,} parameters train"]
    if "projected_train_seconds" in report:
        utilisation = "unknown" if report["mfu"] is None else f"{report['mfu']:.1%}"
        lines += [f"  {report['seconds_per_step']:.3f} s per optimizer step, {report['tokens_per_s']:,.0f} tokens/s, "
                  f"MFU {utilisation}",
                  f"  projected: training {report['projected_train_seconds']:,.0f} s ({report['steps']} steps), "
                  f"evaluation {report['projected_eval_seconds']:,.0f} s ({report['evaluations']} evaluations)",
                  f"  --compile: {report['compile']}"]
    lines += [f"  {report['verdict']}", f"  written to {path}; no checkpoint was saved"]
    return "\n".join(lines)
