"""Which way a model answers questions, chosen from its architecture.

encoder-only -> extractive (a span head points at the answer in the context);
encoder-decoder -> generative seq2seq; decoder-only -> generative from a prompt. `--qa-style`
overrides where the other style makes sense (a T5 or GPT-2 with a span head).
"""
from models.backbones import ENCODER_DECODER, ENCODER_ONLY, architecture, has_span_head
from engine.errors import UserError
from qa.extractive import ExtractiveQA
from qa.generative import GenerativeQA

QA_STYLES = ("extractive", "generative")


def choose_qa_style(config, requested: str | None) -> tuple[str, str]:
    """(qa_style, model_kind) for a model configuration; model_kind is span, seq2seq or causal-lm."""
    kind = architecture(config)
    style = requested or ("extractive" if kind == ENCODER_ONLY else "generative")
    if style == "generative":
        if kind == ENCODER_ONLY:
            raise UserError(f"--qa-style generative: {config.model_type} is an encoder-only model, which cannot generate "
                            "answers; use an encoder-decoder (T5) or decoder-only (GPT-2, Llama) model")
        return style, "seq2seq" if kind == ENCODER_DECODER else "causal-lm"
    if not has_span_head(config):
        raise UserError(f"--qa-style extractive: transformers has no span (question-answering) head for {config.model_type}")
    return style, "span"


def make_qa(settings: dict, tokenizer) -> ExtractiveQA | GenerativeQA:
    return (ExtractiveQA if settings["qa_style"] == "extractive" else GenerativeQA)(tokenizer, settings)
