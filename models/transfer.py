"""Transfer-learning controls: freeze stacks of a model and train only their last blocks, or train
LoRA adapters (through `peft`) instead of the weights.

A model is seen as its stacks (the encoder and/or decoder: embeddings, a list of blocks, a final
norm), its embeddings, and the head (everything outside the stacks: span head, LM head).
"""
import logging

import torch

from engine.errors import UserError
from models.backbones import DECODER_ONLY, ENCODER_DECODER, architecture

log = logging.getLogger(__name__)

FREEZABLE = ("encoder", "decoder", "embeddings")
LORA_TASK_TYPES = {"span": "QUESTION_ANS", "seq2seq": "SEQ_2_SEQ_LM", "causal-lm": "CAUSAL_LM"}


def stacks(model) -> dict[str, torch.nn.Module]:
    kind = architecture(model.config)
    if kind == ENCODER_DECODER:
        return {"encoder": model.get_encoder(), "decoder": model.get_decoder()}
    return {"decoder" if kind == DECODER_ONLY else "encoder": model.base_model}


def blocks(stack: torch.nn.Module) -> torch.nn.ModuleList:
    """The stack's transformer blocks (layer, layers, block, h, ...): the ModuleList holding the most
    parameters. Not the longest list: a T5 decoder block has a list of 3 sub-layers, its stack 2 blocks."""
    lists = [m for m in stack.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise UserError(f"cannot find the transformer blocks of {type(stack).__name__} to freeze")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def transformer_blocks(model) -> list[torch.nn.Module]:
    """Every block of every stack: the units FSDP shards one at a time."""
    return [block for stack in stacks(model).values() for block in blocks(stack)]


def head_parameters(model) -> list[torch.nn.Parameter]:
    """The parameters outside every stack: the span head, or an untied LM head."""
    inside = {id(p) for stack in stacks(model).values() for p in stack.parameters()}
    return [p for p in model.parameters() if id(p) not in inside]


def scale_head(model, scale: float) -> None:
    """Multiply a fresh head's initial weights by `scale` (its biases start at zero)."""
    with torch.no_grad():
        for parameter in head_parameters(model):
            parameter.mul_(scale)


def layer_rate_scales(model, decay: float) -> dict[torch.nn.Parameter, float]:
    """Layer-wise learning-rate decay (ELECTRA, DeBERTa): the factor of each parameter's learning
    rate. In each stack of n blocks, block k (0 first) gets decay^(n-1-k), the embeddings
    decay^n; the head and what follows the blocks (final norm) keep the full rate. Empty for 1."""
    if decay == 1:
        return {}
    embeddings = {id(p) for p in embedding_parameters(model)}
    scales = {}
    for stack in stacks(model).values():
        stack_blocks = blocks(stack)
        for k, block in enumerate(stack_blocks):
            scales.update({p: decay ** (len(stack_blocks) - 1 - k) for p in block.parameters()})
        scales.update({p: decay ** len(stack_blocks) for p in stack.parameters() if id(p) in embeddings})
    return scales


def enable_activation_checkpointing(model) -> None:
    """Recompute each block's activations in the backward pass. Non-reentrant checkpointing also
    works when the inputs' embeddings are frozen (LoRA, --freeze). transformers 5.23 renamed the
    method; the old name, all that earlier 5.x releases have, now warns."""
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


def embedding_parameters(model) -> list[torch.nn.Parameter]:
    """Token (and position, type) embeddings outside the blocks, with the norm BERT applies to them.

    With tied weights the LM head is the token embedding matrix, so freezing embeddings freezes it too.
    """
    inside_blocks = {id(p) for stack in stacks(model).values() for p in blocks(stack).parameters()}
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding) or name.split(".")[-1] == "embeddings":
            found.update({id(p): p for p in module.parameters() if id(p) not in inside_blocks})
    return list(found.values())


def freeze(model, parts: list[str], train_last_layers: int | None) -> None:
    """Freeze `parts` (encoder, decoder, embeddings); with `train_last_layers` N the last N blocks and
    the final norm of every frozen stack train again. `--train-last-layers` alone freezes every stack
    and the embeddings. The head always trains (unless it is tied to frozen embeddings)."""
    model_stacks = stacks(model)
    if train_last_layers and not parts:
        parts = [*model_stacks, "embeddings"]
    for part in parts:
        if part not in FREEZABLE:
            raise UserError(f"--freeze {part}: unknown part (choose from {', '.join(FREEZABLE)})")
        if part != "embeddings" and part not in model_stacks:
            raise UserError(f"--freeze {part}: this {architecture(model.config)} model has no {part} "
                            f"(it has: {', '.join(model_stacks)}, embeddings)")
    embeddings = {id(p) for p in embedding_parameters(model)}
    for part in parts:
        if part == "embeddings":
            continue
        stack = model_stacks[part]
        for parameter in stack.parameters():
            if id(parameter) not in embeddings:
                parameter.requires_grad_(False)
        if train_last_layers:
            stack_blocks = blocks(stack)
            if train_last_layers > len(stack_blocks):
                raise UserError(f"--train-last-layers {train_last_layers}: the {part} has only {len(stack_blocks)} blocks")
            in_blocks = {id(p) for p in stack_blocks.parameters()}
            for parameter in stack.parameters():
                # the last N blocks, and what follows the blocks (final norm, pooler)
                if id(parameter) not in embeddings and id(parameter) not in in_blocks:
                    parameter.requires_grad_(True)
            for block in stack_blocks[-train_last_layers:]:
                block.requires_grad_(True)
    if "embeddings" in parts:
        for parameter in embedding_parameters(model):
            parameter.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError(f"--freeze {','.join(parts)} leaves no parameter to train (the head is tied to the embeddings); "
                        "unfreeze something or use --train-last-layers")


def add_lora(model, kind: str, r: int, alpha: float, dropout: float, targets: str | None):
    """Wrap the model with fresh LoRA adapters; only they (and a span head) train.

    `targets`: comma-separated module names, or none for every linear layer except the output head.
    """
    from peft import LoraConfig, get_peft_model

    # "all-linear" spares only an LM head: a span head (trained whole, as peft's modules_to_save) must
    # be left out of the adapted layers too, or peft refuses to wrap it twice.
    inside_stacks = {id(m) for stack in stacks(model).values() for m in stack.modules()}
    head_layers = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and id(m) not in inside_stacks]
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, task_type=LORA_TASK_TYPES[kind],
        target_modules=targets.split(",") if targets else "all-linear",
        exclude_modules=None if targets else head_layers or None,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as error:
        raise UserError(f"--lora-targets {targets}: {str(error).strip().splitlines()[0]}") from None


def load_lora(model, directory, trainable: bool):
    """The base model with the LoRA adapter saved in `directory`."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(directory), is_trainable=trainable)


def is_lora(model) -> bool:
    return hasattr(model, "peft_config")
