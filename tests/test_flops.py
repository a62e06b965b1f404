"""Model FLOPs of a sequence (models/flops.py): a count by hand for a tiny BERT, and, for each family
(encoder-only, encoder-decoder, decoder-only, GPT-2's Conv1D), full training, LoRA and frozen layers,
against what `torch.utils.flop_counter.FlopCounterMode` counts in a real forward and backward pass.

FlopCounterMode counts matrix products (mm, addmm, bmm) and the CUDA attention kernels, but not the
CPU's SDPA kernel (`_scaled_dot_product_flash_attention_for_cpu`): the models here run eager attention,
whose two matmuls it counts, over the full square, as models/flops.py does.
"""
import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import (AutoModelForCausalLM, AutoModelForQuestionAnswering, AutoModelForSeq2SeqLM, BertConfig,
                          GPT2Config, LlamaConfig, T5Config)

from models.flops import sequence_flops
from models.transfer import add_lora, enable_activation_checkpointing, freeze

BATCH, LENGTH, TARGET_LENGTH = 2, 96, 40
VOCAB = 128
FAMILIES = {  # name: (auto class, configuration, the LoRA task kind)
    "bert": (AutoModelForQuestionAnswering, lambda: BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), "span"),
    "t5": (AutoModelForSeq2SeqLM, lambda: T5Config(
        vocab_size=VOCAB, d_model=64, d_kv=8, d_ff=128, num_layers=2, num_decoder_layers=3, num_heads=6,
        dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0), "seq2seq"),
    "llama": (AutoModelForCausalLM, lambda: LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2), "causal-lm"),
    "gpt2": (AutoModelForCausalLM, lambda: GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=0, eos_token_id=0), "causal-lm"),
}


def build(family: str, transfer: str = "full"):
    """A tiny model of the family with eager attention, trained whole, its last layer only
    ("last-layer"), or through LoRA adapters ("lora")."""
    auto_class, config, kind = FAMILIES[family]
    torch.manual_seed(0)
    model = auto_class.from_config(config(), attn_implementation="eager")
    if transfer == "last-layer":
        freeze(model, [], train_last_layers=1)
    if transfer == "lora":
        model = add_lora(model, kind, 4, 8.0, 0.0, None)
    return model


def batch_of(family: str) -> dict:
    """BATCH sequences of LENGTH tokens (no padding), with the labels of the family's loss."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(VOCAB, (BATCH, LENGTH), generator=generator)
    if family == "bert":
        positions = torch.randint(LENGTH, (BATCH,), generator=generator)
        return {"input_ids": input_ids, "start_positions": positions, "end_positions": positions}
    if family == "t5":
        return {"input_ids": input_ids, "labels": torch.randint(VOCAB, (BATCH, TARGET_LENGTH), generator=generator)}
    return {"input_ids": input_ids, "labels": input_ids}


def counted_flops(model, batch: dict, training: bool) -> int:
    """What FlopCounterMode counts for the batch's forward pass (and the loss's backward pass)."""
    with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(training):
        loss = model(**batch).loss
        if training:
            loss.backward()
    return counter.get_total_flops()


def computed_flops(model, training: bool) -> float:
    flops = sequence_flops(model)
    lengths, target_lengths = np.full(BATCH, LENGTH), np.full(BATCH, TARGET_LENGTH)
    return (flops.training if training else flops.forward)(lengths, target_lengths).sum()


def bert_by_hand(config: BertConfig, length: int) -> dict[str, float]:
    """FLOPs of one sequence of a BERT span model, counted from its configuration."""
    hidden, intermediate, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    attention_block = 4 * hidden * hidden  # query, key, value, output
    feed_forward = 2 * hidden * intermediate
    head = hidden * 2  # start and end logits
    attention = 4 * length * length * hidden  # scores and weighted values, all heads
    forward = 2 * length * (layers * (attention_block + feed_forward) + head) + layers * attention
    # the last layer and the head train; the layer's query, key and value read a frozen input
    last_layer_weights = 2 * length * (attention_block + feed_forward + head)
    last_layer_inputs = 2 * length * (hidden * hidden + feed_forward + head)
    return {"forward": forward, "full": 3 * forward,
            "last-layer": forward + last_layer_weights + last_layer_inputs + 2 * attention}


def test_bert_counted_by_hand():
    config = FAMILIES["bert"][1]()
    expected = bert_by_hand(config, LENGTH)
    model = build("bert")
    lengths = np.array([LENGTH, LENGTH // 2])
    flops = sequence_flops(model)
    assert flops.forward([LENGTH]) == pytest.approx([expected["forward"]], rel=1e-12)
    assert flops.training([LENGTH]) == pytest.approx([expected["full"]], rel=1e-12)
    assert flops.training(lengths) == pytest.approx([expected["full"], bert_by_hand(config, LENGTH // 2)["full"]])
    assert flops.training(lengths).dtype == np.float64
    assert sequence_flops(build("bert", "last-layer")).training([LENGTH]) == pytest.approx([expected["last-layer"]])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("transfer", ["full", "lora", "last-layer"])
def test_training_flops_match_the_flop_counter(family, transfer):
    model = build(family, transfer)
    counted = counted_flops(model, batch_of(family), training=True)
    assert computed_flops(model, training=True) == pytest.approx(counted, rel=0.05)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_flops_match_the_flop_counter(family):
    model = build(family)
    counted = counted_flops(model, batch_of(family), training=False)
    assert computed_flops(model, training=False) == pytest.approx(counted, rel=0.05)


def test_the_same_on_the_meta_device_and_compiled():
    auto_class, config, _ = FAMILIES["t5"]
    expected = computed_flops(build("t5"), training=True)
    with torch.device("meta"):
        on_meta = auto_class.from_config(config(), attn_implementation="eager")
    assert computed_flops(on_meta, training=True) == expected
    compiled = build("t5")
    compiled.compile()
    assert computed_flops(compiled, training=True) == expected


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_activation_checkpointing_counts_no_recomputation(family):
    """Checkpointing a LoRA model makes its embeddings' output require grad (transformers'
    `enable_input_require_grads`), so autograd computes the first layer's input gradients too: they
    count, the recomputed forward does not. (In training mode, without a cache, transformers also
    looks for packed sequences in the positions: a read of data, skipped on fake tensors.)"""
    model = build(family, "lora")
    enable_activation_checkpointing(model)
    model.train()
    without_checkpointing = build(family, "lora")
    without_checkpointing.enable_input_require_grads()
    counted = counted_flops(without_checkpointing, batch_of(family), training=True)
    assert computed_flops(model, training=True) == pytest.approx(counted, rel=0.05)
    assert computed_flops(model, training=True) > computed_flops(build(family, "lora"), training=True)


def test_the_trace_draws_no_random_numbers():
    model = build("bert")
    model.train()  # dropout on
    state = torch.get_rng_state()
    sequence_flops(model)
    assert torch.equal(torch.get_rng_state(), state)


def test_an_encoder_decoder_model_without_decoder_lengths_reads_its_input_in_the_decoder_too():
    flops = sequence_flops(build("t5"))
    assert flops.training([LENGTH]) == flops.training([LENGTH], [LENGTH]) > flops.training([LENGTH], [TARGET_LENGTH])
