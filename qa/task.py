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
from engine.checkpoint import atomic_write_text
from engine.errors import UserError
from models.backbones import load_config, load_tokenizer
from qa.metrics import squad_scores
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
        answers = {qid: p.text for qid, p in predictions.items()}
        scores = squad_scores(answers, self.eval_examples.examples)
        scores["seconds"], scores["windows"] = time.perf_counter() - started, len(self.eval_set)
        atomic_write_text(predictions_file, json.dumps(answers, indent=1, ensure_ascii=False))
        return scores

    @staticmethod
    def describe(scores: dict) -> str:
        text = f"EM {scores['exact_match']:.2f}  F1 {scores['f1']:.2f} on {scores['total']} questions"
        if "NoAns_f1" in scores:
            text += f"  HasAns F1 {scores['HasAns_f1']:.2f}  NoAns F1 {scores['NoAns_f1']:.2f}"
        return text

    SCALARS = ("exact_match", "f1", "HasAns_f1", "NoAns_f1")


def qa_settings(args, qa_style: str, model_kind: str, allow_null: bool) -> dict:
    """What inference must reuse to answer like evaluation did; saved as run_config.json."""
    settings = {"task": "qa", "qa_style": qa_style, "model_kind": model_kind, "max_seq_length": args.max_seq_length,
                "doc_stride": args.doc_stride, "lora": args.lora, "base_model": args.model}
    if qa_style == "extractive":
        return {**settings, "n_best": args.n_best, "max_answer_length": args.max_answer_length, "allow_null": allow_null,
                "null_threshold": args.null_score_diff_threshold}
    template = args.prompt_template or (SEQ2SEQ_TEMPLATE if model_kind == "seq2seq" else DECODER_TEMPLATE)
    no_answer_share = args.no_answer_share if args.no_answer_share is not None else float(allow_null)
    return {**settings, "prompt_template": template, "no_answer_share": no_answer_share,
            "max_answer_tokens": args.max_answer_tokens, "num_beams": args.num_beams}
