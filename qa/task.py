"""Question answering as a training task for train.py: SQuAD files in, windows to train on, EM/F1 out.

A task gives the training loop what it needs and nothing else: the training set (with lengths for
batching), its collator, the summed loss and its target count, an evaluation that returns scores,
and the settings inference must reuse (saved as run_config.json).
"""
import json
import logging
import time
from pathlib import Path

from data import SAMPLES
from data.generative_features import DECODER_TEMPLATE, SEQ2SEQ_TEMPLATE
from data.squad import SquadExamples
from engine.checkpoint import atomic_write_text, load_run_config
from engine.errors import UserError
from models.backbones import load_config, load_tokenizer
from qa.metrics import best_null_thresholds, squad_scores
from qa.styles import choose_qa_style, make_qa

log = logging.getLogger(__name__)


class QATask:
    metric, higher_is_better = "f1", True
    # train.py defaults that differ between tasks
    DEFAULTS = {"train_file": str(SAMPLES / "squad_train.json"), "validation_file": str(SAMPLES / "squad_validation.json"),
                "batch_size": 16, "eval_batch_size": 64}

    def __init__(self, args, base_model: str, resume_from: Path | None):
        # Data first: a mistake in a file is reported before minutes are spent loading a model.
        if args.dataset:
            train_examples = SquadExamples.load(args.dataset, "train", args.max_train_samples)
            self.eval_examples = SquadExamples.load(args.dataset, "validation", args.max_eval_samples)
        else:
            train_examples = SquadExamples.load(args.train_file, max_samples=args.max_train_samples)
            self.eval_examples = SquadExamples.load(args.validation_file, max_samples=args.max_eval_samples)
        qa_style, model_kind = choose_qa_style(load_config(base_model), args.qa_style)
        self.tokenizer = load_tokenizer(str(resume_from or base_model))
        allow_null = train_examples.has_unanswerable or self.eval_examples.has_unanswerable
        self.settings = qa_settings(args, qa_style, model_kind, allow_null)
        # Evaluation decides "no answer" with a fixed threshold (0 unless given); each evaluation also
        # finds the best one, which the checkpoints carry for predict.py unless one was given.
        self.eval_null_threshold = None
        if qa_style == "extractive" and allow_null:
            self.eval_null_threshold = self.settings["null_threshold"]
            if args.null_score_diff_threshold is None and resume_from:
                self.settings["null_threshold"] = load_run_config(resume_from)["null_threshold"]
        self.qa = make_qa(self.settings, self.tokenizer)
        self.train_set = self.qa.features(train_examples.examples, train_examples.source, training=True, seed=args.seed)
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
        """Answer every validation question, score it, and write the answers to `predictions_file`.
        Under torchrun every process answers a share and rank 0 scores them all (the others get None)."""
        started = time.perf_counter()
        predictions = self.qa.answer_questions(model, self.eval_set, device, precision, batch_size)
        if predictions is None:
            return None
        answers, scores, null_odds = score_predictions(predictions, self.eval_examples.examples, self.eval_null_threshold)
        if null_odds is not None and not self.settings["null_threshold_given"]:
            self.settings["null_threshold"] = scores["best_f1_thresh"]
        scores["seconds"], scores["windows"] = time.perf_counter() - started, len(self.eval_set)
        atomic_write_text(predictions_file, json.dumps(answers, indent=1, ensure_ascii=False))
        if null_odds is not None:  # beside the answers, as the official v2 script's --na-prob-file
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

    SCALARS = ("exact_match", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1", "best_exact", "best_f1",
               "best_f1_thresh")


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


def qa_settings(args, qa_style: str, model_kind: str, allow_null: bool) -> dict:
    """What inference must reuse to answer like evaluation did; saved as run_config.json."""
    settings = {"task": "qa", "qa_style": qa_style, "model_kind": model_kind, "max_seq_length": args.max_seq_length,
                "doc_stride": args.doc_stride, "lora": args.lora, "base_model": args.model}
    if qa_style == "extractive":
        given = args.null_score_diff_threshold is not None
        return {**settings, "n_best": args.n_best, "max_answer_length": args.max_answer_length, "allow_null": allow_null,
                "null_threshold": args.null_score_diff_threshold if given else 0.0, "null_threshold_given": given}
    template = args.prompt_template or (SEQ2SEQ_TEMPLATE if model_kind == "seq2seq" else DECODER_TEMPLATE)
    no_answer_share = args.no_answer_share if args.no_answer_share is not None else float(allow_null)
    return {**settings, "prompt_template": template, "no_answer_share": no_answer_share,
            "max_answer_tokens": args.max_answer_tokens, "num_beams": args.num_beams}
