"""Question answering as a training task for train.py: SQuAD files in, windows to train on, EM/F1 out,
and the flags of question answering."""
import json
import time
from dataclasses import dataclass
from pathlib import Path

from data import SAMPLES
from data.generative_features import DECODER_TEMPLATE, SEQ2SEQ_TEMPLATE
from data.squad import SquadExamples
from engine.errors import UserError
from engine.files import atomic_write_text
from engine.settings import HPARAM, TRAJECTORY, setting
from engine.task import Task
from models.backbones import load_config, load_tokenizer
from models.build import check_transfer
from models.limits import check_positions
from qa.metrics import best_null_thresholds, squad_scores
from qa.styles import QA_STYLES, choose_qa_style, make_qa


@dataclass(frozen=True)
class AnswerSettings:
    """answers (train.py and predict.py)"""

    max_answer_tokens: int = setting(32, "generative: longest answer, in tokens", at_least=1)
    num_beams: int = setting(1, "generative: beam search width (1: greedy)", at_least=1)
    null_score_diff_threshold: float | None = setting(
        None, "extractive, with unanswerable (SQuAD v2) questions: answer 'no answer' when the null score minus the best "
              "span's score exceeds this. Unset, train.py scores with 0 and also finds the threshold with the best F1 "
              "on the validation set (best_f1_thresh), which its checkpoints keep for predict.py")


@dataclass(frozen=True)
class QASettings(AnswerSettings):
    """question answering (--task qa)"""

    qa_style: str | None = setting(
        None, "default from the model: encoder-only -> extractive span head; encoder-decoder (T5) and decoder-only "
              "(GPT-2, Llama) -> generated answers", choices=QA_STYLES, roles=(TRAJECTORY, HPARAM))
    max_train_samples: int | None = setting(None, "use only the first N training questions, in file order",
                                            at_least=1, roles=(TRAJECTORY,))
    max_eval_samples: int | None = setting(None, "use only the first N validation questions, in file order",
                                           at_least=1)
    max_seq_length: int = setting(384, "tokens per window (question + context)", at_least=1, roles=(TRAJECTORY,))
    doc_stride: int = setting(128, "tokens of overlap between consecutive windows of a long context",
                              at_least=0, roles=(TRAJECTORY,))
    n_best: int = setting(20, "extractive: start and end candidates per window in the span search", at_least=1)
    max_answer_length: int = setting(30, "extractive: longest answer span, in tokens", at_least=1)
    prompt_template: str | None = setting(
        None, f"generative: with {{question}} and {{context}}; default {SEQ2SEQ_TEMPLATE!r} for seq2seq and "
              f"{DECODER_TEMPLATE!r} for decoder-only models, inside the model's chat template when it has one",
        roles=(TRAJECTORY,))
    no_answer_share: float | None = setting(
        None, "generative: share of windows without the answer (all windows of unanswerable v2 questions, and windows "
              "of long contexts that miss it) trained to answer nothing; auto: all if the training data has "
              "unanswerable questions, else none", auto=True, between=(0, 1), roles=(TRAJECTORY,))


class QATask(Task):
    metric, higher_is_better = "f1", True
    scalars = ("exact_match", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1", "best_exact", "best_f1",
               "best_f1_thresh")

    DEFAULTS = {"train_file": str(SAMPLES / "squad_train.json"), "validation_file": str(SAMPLES / "squad_validation.json"),
                "batch_size": 16, "eval_batch_size": 64}

    @staticmethod
    def default_model(settings) -> str:
        return "smollm2-135m" if settings.qa_style == "generative" else "minilm-l6"

    def __init__(self, settings, model_source: str, saved_run_config: dict | None):
        # The flags against the model's configuration (cheap), then the data: a mistake in either is
        # reported before minutes are spent loading a model.
        config = load_config(model_source)
        qa_style, model_kind = choose_qa_style(config, settings.qa_style)
        check_qa_lengths(config, settings.model, model_kind, settings.max_seq_length, settings.doc_stride,
                         settings.max_answer_tokens)
        check_transfer(settings, config, model_kind)
        if settings.dataset:
            train_examples = SquadExamples.load(settings.dataset, "train", settings.max_train_samples)
            self.eval_examples = SquadExamples.load(settings.dataset, "validation", settings.max_eval_samples)
        else:
            train_examples = SquadExamples.load(settings.train_file, max_samples=settings.max_train_samples)
            self.eval_examples = SquadExamples.load(settings.validation_file, max_samples=settings.max_eval_samples)
        self.tokenizer = load_tokenizer(model_source)
        allow_null = train_examples.has_unanswerable or self.eval_examples.has_unanswerable
        self.run_config = qa_run_config(settings, qa_style, model_kind, allow_null)
        # Evaluation decides "no answer" with a fixed threshold (0 unless given); each evaluation also
        # finds the best one, which the checkpoints carry for predict.py unless one was given: a
        # resumed run starts from the one its checkpoint carried, as the uninterrupted run would.
        self.eval_null_threshold = None
        if qa_style == "extractive" and allow_null:
            self.eval_null_threshold = self.run_config["null_threshold"]
            if settings.null_score_diff_threshold is None and saved_run_config:
                self.run_config["null_threshold"] = saved_run_config["null_threshold"]
        self.qa = make_qa(self.run_config, self.tokenizer)
        self.train_set = self.qa.features(train_examples.examples, train_examples.source, training=True,
                                          seed=settings.seed)
        self.eval_set = self.qa.features(self.eval_examples.examples, self.eval_examples.source)
        if not len(self.train_set):
            raise UserError(f"{train_examples.source}: no training window holds an answer (raise --no-answer-share to "
                            "train on windows without one)")
        self.collate = self.qa.collate(self.train_set)
        self.description = (f"{qa_style} QA ({model_kind}); train: {len(train_examples)} questions -> "
                            f"{len(self.train_set)} windows; validation: {len(self.eval_examples)} questions")

    def loss(self, model, batch):
        return self.qa.loss(model, batch)

    def count_targets(self, batch) -> int:
        return self.qa.count_targets(batch)

    def evaluate(self, model, device, precision: str, batch_size: int, predictions_file: Path) -> dict | None:
        """Answer every validation question, score it, and write the answers to `predictions_file`
        (with SQuAD v2's null odds beside them, as the official script's --na-prob-file)."""
        started = time.perf_counter()
        predictions = self.qa.answer_questions(model, self.eval_set, device, precision, batch_size)
        if predictions is None:
            return None
        answers, scores, null_odds = score_predictions(predictions, self.eval_examples.examples, self.eval_null_threshold)
        if null_odds is not None and not self.run_config["null_threshold_given"]:
            self.run_config["null_threshold"] = scores["best_f1_thresh"]
        scores["seconds"], scores["windows"] = time.perf_counter() - started, len(self.eval_set)
        atomic_write_text(predictions_file, json.dumps(answers, indent=1, ensure_ascii=False))
        if null_odds is not None:
            atomic_write_text(predictions_file.with_name(predictions_file.name.replace("predictions", "null_odds")),
                              json.dumps(null_odds, indent=1))
        return scores

    @staticmethod
    def describe(scores: dict) -> str:
        text = f"EM {scores['exact_match']:.2f}  F1 {scores['f1']:.2f} on {scores['total']} questions"
        if "NoAns_f1" in scores:
            text += f"  HasAns F1 {scores['HasAns_f1']:.2f}  NoAns F1 {scores['NoAns_f1']:.2f}"
        if "best_f1" in scores:
            text += f"  best F1 {scores['best_f1']:.2f} at null threshold {scores['best_f1_thresh']:.3g}"
        return text


def score_predictions(predictions: dict, examples: list, null_threshold: float | None) -> tuple[dict, dict, dict | None]:
    """The answers by question id, their scores, and the null odds.

    With `null_threshold` (extractive answers on data with unanswerable questions) the threshold
    decides "no answer", and the official v2 script's best_exact / best_f1 and their thresholds
    are searched on the same spans and odds.
    """
    if null_threshold is None:
        answers = {qid: p.text for qid, p in predictions.items()}
        return answers, squad_scores(answers, examples), None
    spans = {qid: p.span for qid, p in predictions.items()}
    null_odds = {qid: p.null_score_diff for qid, p in predictions.items()}
    answers = {qid: "" if null_odds[qid] > null_threshold else span for qid, span in spans.items()}
    scores = {**squad_scores(answers, examples), **best_null_thresholds(spans, null_odds, examples),
              "null_threshold": null_threshold}
    return answers, scores, null_odds


def check_qa_lengths(config, model: str, model_kind: str, max_seq_length: int, doc_stride: int,
                     max_answer_tokens: int) -> None:
    """The window flags against each other and against the positions of `model` (models/limits.py):
    an encoder's window; a seq2seq model's prompt (its encoder's input) and the answer its decoder
    writes after its start token; a decoder-only model's prompt and answer, one sequence.

    Whether a question leaves room for context in a window depends on the tokenizer and the data
    (data/qa_features.py). --max-answer-length and --n-best need no limit: a span longer than the
    window, or more candidates than it has tokens, cannot occur, and the search takes what there is.
    """
    if doc_stride >= max_seq_length:
        raise UserError(f"--doc-stride {doc_stride} must be smaller than --max-seq-length {max_seq_length}")
    if model_kind == "causal-lm":
        check_positions(config, model, {"--max-seq-length": max_seq_length, "--max-answer-tokens": max_answer_tokens})
        return
    check_positions(config, model, {"--max-seq-length": max_seq_length})
    if model_kind == "seq2seq":
        check_positions(config, model, {"--max-answer-tokens": max_answer_tokens, "decoder start token": 1})


def qa_run_config(settings, qa_style: str, model_kind: str, allow_null: bool) -> dict:
    """What inference must reuse to answer like evaluation did; saved as run_config.json."""
    run_config = {"task": "qa", "qa_style": qa_style, "model_kind": model_kind, "max_seq_length": settings.max_seq_length,
                  "doc_stride": settings.doc_stride, "lora": settings.lora, "base_model": settings.model}
    if qa_style == "extractive":
        given = settings.null_score_diff_threshold is not None
        return {**run_config, "n_best": settings.n_best, "max_answer_length": settings.max_answer_length,
                "allow_null": allow_null, "null_threshold": settings.null_score_diff_threshold if given else 0.0,
                "null_threshold_given": given}
    template = settings.prompt_template or (SEQ2SEQ_TEMPLATE if model_kind == "seq2seq" else DECODER_TEMPLATE)
    no_answer_share = settings.no_answer_share if settings.no_answer_share is not None else float(allow_null)
    return {**run_config, "prompt_template": template, "no_answer_share": no_answer_share,
            "max_answer_tokens": settings.max_answer_tokens, "num_beams": settings.num_beams}
