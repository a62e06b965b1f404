"""The chunked LM-head loss gives the loss and gradients of F.cross_entropy on full logits: tied and
untied heads, LoRA, gradient checkpointing, padding, several chunks, and under bf16 autocast; and it
never builds the full [positions x vocabulary] logits."""
import pytest
import torch
import torch.nn.functional as F

import models.lm_head_loss
from clm.language_model import next_token_loss
from data.batching import PadToLongest
from models.backbones import load_model
from models.transfer import add_lora, enable_activation_checkpointing


def tiny_llama(directory, tied: bool):
    model = load_model(str(directory), "causal-lm")
    if not tied:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() * 1.5)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    return model


def padded_batch(vocab: int) -> dict:
    """Two rows of 12, the second right-padded after 7 tokens (labels -100 there), by PadToLongest."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, vocab, (2, 12), generator=generator).tolist()
    labels = torch.randint(3, vocab, (2, 12), generator=generator).tolist()
    features = [{"input_ids": input_ids[0], "labels": labels[0]}, {"input_ids": input_ids[1][:7], "labels": labels[1][:7]}]
    return PadToLongest(pad_token_id=0)(features)


def full_logits_loss(model, batch: dict) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100, reduction="sum")


def loss_and_gradients(model, loss_fn, batch) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch)
    (loss * 0.37).backward()  # a scaled loss, as the training loop's normalisation makes it
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tied", [True, False], ids=["tied-head", "untied-head"])
@pytest.mark.parametrize("lora,checkpointing", [(False, False), (True, False), (False, True)],
                         ids=["full", "lora", "gradient-checkpointing"])
def test_chunked_loss_equals_full_logits_cross_entropy(tiny_llama_dir, monkeypatch, tied, lora, checkpointing):
    monkeypatch.setattr(models.lm_head_loss, "CHUNK_POSITIONS", 5)  # 19 targets: four chunks, the last partial
    model = tiny_llama(tiny_llama_dir, tied)
    if checkpointing:
        enable_activation_checkpointing(model)
    if lora:
        model = add_lora(model, "causal-lm", r=4, alpha=8, dropout=0.0, targets=None)
    model.train()
    batch = padded_batch(model.config.vocab_size)
    expected_loss, expected = loss_and_gradients(model, full_logits_loss, batch)
    loss, gradients = loss_and_gradients(model, next_token_loss, batch)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=1e-5)
    assert gradients.keys() == expected.keys() and len(gradients) > 0
    head_names = [n for n in gradients if "lm_head" in n or "embed_tokens" in n]
    assert bool(head_names) != lora  # LoRA freezes the head; full fine-tuning trains it
    for name in gradients:
        # The two losses sum in different orders: fp32 round-off scales with a tensor's largest values
        # (1e-6 absolute on weights up to 1.3 on an AMD EPYC), not with each element.
        scale = expected[name].abs().max().item()
        torch.testing.assert_close(gradients[name], expected[name], rtol=1e-5, atol=max(1e-6, 1e-5 * scale), msg=name)


def test_chunked_loss_under_bf16_autocast_is_as_close_to_fp32_as_full_logits_are(tiny_llama_dir, monkeypatch):
    """Under autocast both losses round their products to bf16, each in its own order: each must be
    as close to the fp32 result as the other is."""
    monkeypatch.setattr(models.lm_head_loss, "CHUNK_POSITIONS", 5)
    model = tiny_llama(tiny_llama_dir, tied=True)
    batch = padded_batch(model.config.vocab_size)

    def under_bf16(loss_fn):
        def run(model, batch):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return loss_fn(model, batch)
        return run

    exact_loss, exact = loss_and_gradients(model, full_logits_loss, batch)
    full_loss, full = loss_and_gradients(model, under_bf16(full_logits_loss), batch)
    loss, gradients = loss_and_gradients(model, under_bf16(next_token_loss), batch)
    assert abs(loss - exact_loss) <= 2 * abs(full_loss - exact_loss) + 1e-3 * exact_loss
    for name in exact:
        ours, theirs = (torch.linalg.norm(g[name] - exact[name]) for g in (gradients, full))
        assert ours <= 2 * theirs + 1e-6, name


def test_no_tensor_as_large_as_the_full_logits_is_built(tiny_llama_dir, monkeypatch):
    monkeypatch.setattr(models.lm_head_loss, "CHUNK_POSITIONS", 5)
    model = tiny_llama(tiny_llama_dir, tied=True)
    batch = padded_batch(model.config.vocab_size)
    vocab, positions = model.config.vocab_size, batch["input_ids"].numel()
    head_weight = model.lm_head.weight.untyped_storage().data_ptr()
    largest = []

    class Sizes(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if (isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[-1] == vocab
                        and t.untyped_storage().data_ptr() != head_weight):  # the weight's transpose is no logits
                    largest.append(t.numel() // vocab)
            return out

    with Sizes():
        next_token_loss(model, batch).backward()
    assert largest and max(largest) <= 5 < positions  # rows of vocabulary width: one chunk at most
