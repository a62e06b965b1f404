"""SQuAD examples -> model features: question + context windows with offsets and span labels.

A context longer than the window is cut into overlapping windows (`doc_stride` tokens of overlap),
and every window is kept: in training a window that does not contain the whole answer (and every
window of an unanswerable question) is labelled with the CLS position, and at evaluation the best
span is searched over all windows of an example.
"""
import numpy as np
from torch.utils.data import Dataset

from data.squad import SquadExample
from engine.errors import UserError
from engine.progress import progress

TOKENIZE_CHUNK = 1000


class SquadFeatures(Dataset):
    def __init__(
        self, examples: list[SquadExample], tokenizer, max_seq_length: int = 384, doc_stride: int = 128, source: str = ""
    ):
        """`source` names the examples' file in error messages."""
        self.examples = examples
        self.pad_token_id = tokenizer.pad_token_id
        questions = [e.question.lstrip() for e in examples]  # leading spaces only waste window room
        _check_question_lengths(examples, questions, tokenizer, max_seq_length, doc_stride, source)
        self.input_ids, example_index = [], []
        self.token_type_ids = [] if "token_type_ids" in tokenizer.model_input_names else None
        # Character offsets of context tokens; -1 marks question, special and padding tokens.
        self.offsets = []
        self.start_positions, self.end_positions, self.cls_index = [], [], []
        # Tokenized a chunk of questions at a time, so that the progress bar moves on large files.
        for first in progress(range(0, len(examples), TOKENIZE_CHUNK), "windows", f"x{TOKENIZE_CHUNK} questions"):
            encoded = tokenizer(
                questions[first : first + TOKENIZE_CHUNK],
                [e.context for e in examples[first : first + TOKENIZE_CHUNK]],
                truncation="only_second",
                max_length=max_seq_length,
                stride=doc_stride,
                return_overflowing_tokens=True,
                return_offsets_mapping=True,
                return_token_type_ids=self.token_type_ids is not None,
            )
            self.input_ids += encoded["input_ids"]
            if self.token_type_ids is not None:
                self.token_type_ids += encoded["token_type_ids"]
            for i, index in enumerate(encoded["overflow_to_sample_mapping"]):
                example_index.append(first + index)
                sequence_ids = encoded.sequence_ids(i)
                offsets = np.array(
                    [o if s == 1 else (-1, -1) for o, s in zip(encoded["offset_mapping"][i], sequence_ids)], dtype=np.int64
                )
                self.offsets.append(offsets)
                ids = encoded["input_ids"][i]
                cls_index = ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0
                start, end = _span_labels(examples[first + index], offsets, cls_index)
                self.cls_index.append(cls_index)
                self.start_positions.append(start)
                self.end_positions.append(end)
        self.example_index = np.asarray(example_index, dtype=np.int64)
        self.lengths = np.array([len(ids) for ids in self.input_ids])
        self.target_lengths = None  # one sequence: the model reads and answers in it
        # Windows that share a paragraph: training batches keep them apart (see data.batching).
        context_ids: dict[str, int] = {}
        self.paragraph_ids = np.array([context_ids.setdefault(examples[i].context, len(context_ids)) for i in self.example_index])

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict:
        feature = {
            "input_ids": self.input_ids[index],
            "start_positions": self.start_positions[index],
            "end_positions": self.end_positions[index],
            "feature_index": index,
        }
        if self.token_type_ids is not None:
            feature["token_type_ids"] = self.token_type_ids[index]
        return feature


def _check_question_lengths(examples, questions, tokenizer, max_seq_length, doc_stride, source):
    """Each window must hold the question and more than `doc_stride` context tokens (a stride below the
    window is checked with the flags, qa/task.py)."""
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    limit = max_seq_length - specials - doc_stride - 1
    lengths = [len(ids) for ids in tokenizer(questions, add_special_tokens=False)["input_ids"]]
    for example, length in zip(examples, lengths):
        if length > limit:
            raise UserError(
                f"{source}: question {example.id!r} is {length} tokens long, but with --max-seq-length {max_seq_length} "
                f"and --doc-stride {doc_stride} a question may have at most {limit}: shorten it or raise --max-seq-length"
            )


def _span_labels(example: SquadExample, offsets: np.ndarray, cls_index: int) -> tuple[int, int]:
    """Token positions of the first gold answer in this window, or CLS when the window lacks it."""
    if not example.answer_texts:  # unanswerable, or a question to predict with no known answer
        return cls_index, cls_index
    start_char = example.answer_starts[0]
    end_char = start_char + len(example.answer_texts[0])
    in_context = np.flatnonzero(offsets[:, 0] >= 0)
    # A context of characters the tokenizer drops (control characters, for BERT) has no tokens at all.
    if not in_context.size or offsets[in_context[0], 0] > start_char or offsets[in_context[-1], 1] < end_char:
        return cls_index, cls_index
    # The answer's first token is the last context token starting at or before start_char, its last
    # token the first context token ending at or after end_char.
    start = in_context[np.flatnonzero(offsets[in_context, 0] <= start_char)[-1]]
    end = in_context[np.flatnonzero(offsets[in_context, 1] >= end_char)[0]]
    return int(start), int(end)
