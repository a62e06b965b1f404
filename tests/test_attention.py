"""models/attention.py: the attention kernel chosen per device and precision gives the same loss
as torch's SDPA, to the precision's rounding, for every kind of model."""
import logging

import pytest
import torch

from models.attention import EAGER, SDPA, SDPA_FP32, choose_attention, is_decoder_only, set_attention
from models.backbones import load_model

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("device, precision, decoder_only, expected", [
    (CPU, "bf16", False, SDPA_FP32), (CPU, "bf16", True, EAGER), (CPU, "fp32", False, SDPA), (CPU, "fp32", True, SDPA),
    (CUDA, "bf16", False, SDPA), (CUDA, "bf16", True, SDPA), (CUDA, "fp16", False, SDPA)])
def test_auto_choice(device, precision, decoder_only, expected):
    choice, why = choose_attention("auto", device, precision, decoder_only)
    assert choice == expected and why


def test_requested_choice_is_kept():
    assert choose_attention(EAGER, CPU, "bf16", False) == (EAGER, "as requested")


def test_decoder_only_models_are_told_apart(model_and_kind):
    model, kind = model_and_kind
    assert is_decoder_only(model) is (kind == "causal-lm")


def loss_and_gradients(model, batch: dict, precision: str) -> tuple[float, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = model(**batch).loss
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def batches(kind: str) -> dict:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (3, 24), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 15:] = mask[2, 9:] = 0  # padded rows: the mask reaches the kernel
    if kind == "span":
        return {"input_ids": ids, "attention_mask": mask, "start_positions": torch.tensor([1, 2, 3]),
                "end_positions": torch.tensor([4, 5, 6])}
    labels = ids.masked_fill(mask == 0, -100)
    if kind == "seq2seq":
        return {"input_ids": ids, "attention_mask": mask, "labels": labels[:, :8].contiguous()}
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.fixture(params=["span", "seq2seq", "causal-lm"])
def model_and_kind(request, tiny_model_dir_no_dropout, tiny_t5_dir, tiny_llama_dir):
    path = {"span": tiny_model_dir_no_dropout, "seq2seq": tiny_t5_dir, "causal-lm": tiny_llama_dir}[request.param]
    return load_model(str(path), request.param), request.param


def test_fp32_sdpa_gives_the_loss_of_sdpa(model_and_kind):
    """In fp32 it is the same kernel on the same inputs: bit for bit. In bf16 only the attention's
    rounding differs: the loss and gradients stay as close to sdpa's as sdpa's are to fp32's."""
    model, kind = model_and_kind
    batch = batches(kind)
    assert set_attention(model, SDPA) == "sdpa"
    reference = {precision: loss_and_gradients(model, batch, precision) for precision in ("fp32", "bf16")}
    assert set_attention(model, SDPA_FP32) == "sdpa_fp32"
    fp32_loss, fp32_gradients = loss_and_gradients(model, batch, "fp32")
    assert fp32_loss == reference["fp32"][0] and torch.equal(fp32_gradients, reference["fp32"][1])
    bf16_loss, bf16_gradients = loss_and_gradients(model, batch, "bf16")
    sdpa_error = abs(reference["bf16"][0] - fp32_loss)
    assert abs(bf16_loss - fp32_loss) <= 2 * sdpa_error + 1e-3 * abs(fp32_loss)
    assert torch.nn.functional.cosine_similarity(bf16_gradients, fp32_gradients, dim=0) > 0.99


def test_bf16_eager_attention_of_a_decoder_gives_the_loss_of_sdpa(tiny_llama_dir):
    """What auto picks for decoder-only models on the CPU in bf16: as close to fp32 as SDPA is."""
    model, batch = load_model(str(tiny_llama_dir), "causal-lm"), batches("causal-lm")
    set_attention(model, SDPA)
    fp32_loss, fp32_gradients = loss_and_gradients(model, batch, "fp32")
    sdpa_loss, _ = loss_and_gradients(model, batch, "bf16")
    assert set_attention(model, EAGER) == "eager"
    eager_loss, eager_gradients = loss_and_gradients(model, batch, "bf16")
    assert abs(eager_loss - fp32_loss) <= 2 * abs(sdpa_loss - fp32_loss) + 1e-3 * abs(fp32_loss)
    assert torch.nn.functional.cosine_similarity(eager_gradients, fp32_gradients, dim=0) > 0.99

def test_a_saved_model_does_not_need_the_registered_kernel(model_and_kind, tmp_path):
    """The choice belongs to the run, not the checkpoint: config.json keeps no attention setting, so
    a plain transformers process loads it."""
    model, _ = model_and_kind
    set_attention(model, SDPA_FP32)
    model.save_pretrained(tmp_path)
    assert "sdpa_fp32" not in (tmp_path / "config.json").read_text()


def test_lora_model_switches_its_base(tiny_model_dir_no_dropout):
    from models.transfer import add_lora

    model = add_lora(load_model(str(tiny_model_dir_no_dropout), "span"), "span", 4, 8, 0.0, None)
    assert set_attention(model, SDPA_FP32) == "sdpa_fp32"
    assert model.get_base_model().config._attn_implementation == "sdpa_fp32"


def test_training_logs_its_choices(tiny_model_dir, tmp_path, caplog):
    import train
    from conftest import tiny_args

    argv = [a if a != "fp32" else "bf16" for a in tiny_args(tiny_model_dir, tmp_path)]
    with caplog.at_level(logging.INFO, logger="train"):
        run = train.setup(train.parse_settings(argv), CPU)
    assert run.model.config._attn_implementation == "sdpa_fp32"
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("precision bf16"))
    assert "as requested" in line and "attention sdpa-fp32" in line and "dropout layers" in line


def test_fp32_sdpa_runs_the_kernel_in_fp32_inside_bf16_autocast(model_and_kind, monkeypatch):
    model, kind = model_and_kind
    seen = []
    kernel = torch.nn.functional.scaled_dot_product_attention

    def recording(query, key, value, *args, **kwargs):
        # autocast casts inside the op: it must be off for the kernel to see these fp32 inputs
        seen.append((query.dtype, key.dtype, value.dtype, torch.is_autocast_enabled("cpu")))
        return kernel(query, key, value, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    set_attention(model, SDPA_FP32)
    loss_and_gradients(model, batches(kind), "bf16")
    assert seen and set(seen) == {(torch.float32,) * 3 + (False,)}
    set_attention(model, SDPA)
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(**batches(kind))
    assert seen and all(enabled for *_, enabled in seen)
