"""Which attention kernel a model runs, for the device and precision in force (`--attention`).

- `sdpa`: torch's scaled_dot_product_attention in the autocast precision (flash attention on a GPU).
- `sdpa-fp32`: the same kernel, with queries, keys and values cast to fp32 and the result cast back.
  On the CPU in bf16, torch's flash-attention backward calls a small GEMM per tile, and bf16 GEMMs
  with a bf16 output each go through a oneDNN call: one MiniLM layer's attention forward and
  backward took 245 ms in bf16 against 192 ms in fp32 on an AMX Xeon (bench/results/attention.md
  for this machine). The casts cost a few percent of that.
- `eager`: the model's own matmul-softmax-matmul (needed for attention weights as output).

`auto` picks, on the CPU in bf16, `eager` for decoder-only models and `sdpa-fp32` for the others,
and `sdpa` everywhere else. At SmolLM2-135M's shape (9 heads of 64, causal, 256 tokens) the eager
bf16 matmuls ran forward + backward 1.8x as fast as bf16 `sdpa` on an AMD EPYC, and its training
step 1.14x; at MiniLM's (12 heads of 32, padded, 384 tokens) eager is 2-4x slower than either SDPA.
A model whose attention does not go through transformers' attention interface (it cannot switch
kernels) keeps its own.
"""
import torch

AUTO, SDPA, SDPA_FP32, EAGER = "auto", "sdpa", "sdpa-fp32", "eager"
CHOICES = (AUTO, SDPA, SDPA_FP32, EAGER)
# transformers' name for each choice; the registered name must contain "sdpa" so that transformers
# checks the model supports scaled_dot_product_attention before using it.
TRANSFORMERS_NAMES = {SDPA: "sdpa", SDPA_FP32: "sdpa_fp32", EAGER: "eager"}


def sdpa_in_fp32(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention run in fp32 whatever the autocast precision, cast back after."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dtype = query.dtype

    def fp32(value):  # additive masks and T5's position bias too
        return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value

    with torch.autocast(query.device.type, enabled=False):  # autocast would cast SDPA's inputs back to bf16
        output, weights = sdpa_attention_forward(module, fp32(query), fp32(key), fp32(value), fp32(attention_mask),
                                                 **{name: fp32(value) for name, value in kwargs.items()})
    return output.to(dtype), weights


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(TRANSFORMERS_NAMES[SDPA_FP32], sdpa_in_fp32)
    AttentionMaskInterface.register(TRANSFORMERS_NAMES[SDPA_FP32], sdpa_mask)  # the masks SDPA takes


def _unwrapped(model):
    """The transformers model inside a peft model (LoRA), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_decoder_only(model) -> bool:
    """A causal LM (SmolLM2, GPT-2, Llama), as against encoders and encoder-decoders."""
    model = _unwrapped(model)
    return model.can_generate() and not model.config.is_encoder_decoder


def choose_attention(requested: str, device: torch.device, precision: str, decoder_only: bool) -> tuple[str, str]:
    """(choice, why) for `--attention requested`."""
    if requested != AUTO:
        return requested, "as requested"
    if device.type == "cpu" and precision == "bf16":
        if decoder_only:
            return EAGER, "on the CPU in bf16, a decoder's eager attention trains faster than SDPA"
        return SDPA_FP32, "on the CPU, SDPA's backward in bf16 is slower than in fp32"
    return SDPA, f"SDPA in {precision} on {device.type}"


def set_attention(model, choice: str) -> str:
    """Make `model` (a transformers model, or a peft model around one) run `choice`; returns the
    attention it runs (its own, when it cannot switch)."""
    model = _unwrapped(model)
    current = model.config._attn_implementation
    if not model._can_set_attn_implementation():
        return current
    _register()
    try:
        model.set_attn_implementation(TRANSFORMERS_NAMES[choice])
    except (ValueError, ImportError):  # a model without SDPA support: it keeps what it runs
        return current
    return model.config._attn_implementation
