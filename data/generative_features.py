"""SQuAD examples -> token sequences for generative QA: a prompt per context window, plus the answer.

Seq2seq (T5, BART): the encoder reads the prompt, e.g. `question: {q} context: {c}`, and the labels
are the answer followed by EOS. Decoder-only (GPT-2, Llama, SmolLM2): the prompt (in the model's
chat template when it has one) and the answer + EOS form one sequence; the labels are -100 over the
prompt, so the loss covers only the answer and its EOS. Labels are built from lengths, never by
comparing with the pad token, so EOS stays a target even when the pad token is EOS.

A context too long for one prompt is cut into windows of context tokens overlapping by `doc_stride`,
as in extractive QA. Training keeps the windows that contain the first gold answer, plus a share of
the others (all windows of unanswerable v2 questions and windows that miss the answer), whose
target is the empty answer (EOS alone). Evaluation keeps every window.
"""
import string

import numpy as np
from torch.utils.data import Dataset

from data.squad import SquadExample
from engine.errors import UserError
from engine.progress import progress

SEQ2SEQ_TEMPLATE = "question: {question} context: {context}"
DECODER_TEMPLATE = "Context: {context}\n\nQuestion: {question}\n\nAnswer with a short phrase copied from the context."
# Without a chat template, the prompt ends with a cue and the answer follows after a space.
PLAIN_ANSWER_CUE = "\nAnswer:"


def check_template(template: str) -> str:
    fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    if sorted(fields) != ["context", "question"]:
        raise UserError(
            f"--prompt-template {template!r} must contain {{question}} and {{context}} once each and no other "
            f"{{fields}} (found {fields}); write literal braces as {{{{ and }}}}"
        )
    return template


class GenerativeQAFeatures(Dataset):
    def __init__(
        self,
        examples: list[SquadExample],
        tokenizer,
        template: str,
        decoder_only: bool,
        max_seq_length: int = 384,
        doc_stride: int = 128,
        training: bool = False,
        no_answer_share: float = 0.0,
        seed: int = 0,
        source: str = "",
    ):
        """`source` names the examples' file in error messages."""
        if tokenizer.eos_token_id is None:
            raise UserError("the tokenizer has no EOS token, so generated answers could not end")
        self.examples = examples
        self.tokenizer = tokenizer
        self.template = check_template(template)
        self.decoder_only = decoder_only
        self.use_chat_template = decoder_only and bool(getattr(tokenizer, "chat_template", None))
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.padding_side = "left" if decoder_only else "right"  # decoder-only: answers start right after every prompt

        overheads = [len(ids) for ids in self._prompt_ids([(e.question, "") for e in examples])]
        limit = max_seq_length - doc_stride - 1
        for example, overhead in zip(examples, overheads):
            if overhead > limit:
                raise UserError(
                    f"{source}: the prompt of question {example.id!r} takes {overhead} tokens without its context, but with "
                    f"--max-seq-length {max_seq_length} and --doc-stride {doc_stride} at most {limit} fit: shorten it or "
                    "raise --max-seq-length"
                )
        contexts = tokenizer([e.context for e in examples], add_special_tokens=False, return_offsets_mapping=True)
        rng = np.random.default_rng(seed)
        windows = []  # (example index, first char, end char, target answer or None)
        for index, (example, overhead) in enumerate(progress(zip(examples, overheads), "windows",
                                                             "question", total=len(examples))):
            for first, end in _window_spans(contexts["offset_mapping"][index], max_seq_length - overhead, doc_stride):
                target = _answer_in(example, first, end)
                if training and target is None:
                    if rng.random() >= no_answer_share:
                        continue
                    target = ""
                windows.append((index, first, end, target))
        # The window's text is tokenized again inside the prompt; at its edges that can differ from the
        # context's own tokens by a merge, so a prompt may exceed max_seq_length by a token or two.
        self.example_index = np.array([w[0] for w in windows], dtype=np.int64)
        self.window_chars = np.array([(w[1], w[2]) for w in windows], dtype=np.int64).reshape(-1, 2)
        prompts = self._prompt_ids([(examples[i].question, examples[i].context[a:b]) for i, a, b, _ in windows])
        self.input_ids, self.labels = [], []
        for prompt, (_, _, _, target) in zip(prompts, windows):
            if not training:
                self.input_ids.append(prompt)
                continue
            answer = self._answer_ids(target)
            if decoder_only:
                self.input_ids.append(prompt + answer)
                self.labels.append([-100] * len(prompt) + answer)
            else:
                self.input_ids.append(prompt)
                self.labels.append(answer)
        self.lengths = np.array([len(ids) for ids in self.input_ids], dtype=np.int64)
        # A seq2seq model's decoder reads the answer apart from the prompt: training's labels; none given
        # at evaluation, where it generates them (for model FLOPs: models/flops.py).
        self.target_lengths = None if decoder_only else np.array([len(ids) for ids in self.labels] if training else
                                                                 [0] * len(self.input_ids), dtype=np.int64)
        # Windows that share a paragraph: training batches keep them apart (see data.batching).
        context_ids: dict[str, int] = {}
        self.paragraph_ids = np.array([context_ids.setdefault(examples[i].context, len(context_ids)) for i in self.example_index])

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict:
        feature = {"input_ids": self.input_ids[index], "feature_index": index}
        if self.labels:
            feature["labels"] = self.labels[index]
        return feature

    def prompt_text(self, question: str, context: str) -> str:
        text = self.template.format(question=question.strip(), context=context)
        if not self.decoder_only:
            return text
        if self.use_chat_template:
            messages = [{"role": "user", "content": text}]
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return text + PLAIN_ANSWER_CUE

    def _prompt_ids(self, pairs: list[tuple[str, str]]) -> list[list[int]]:
        if not pairs:
            return []
        texts = [self.prompt_text(question, context) for question, context in pairs]
        # The seq2seq encoder input gets the tokenizer's special tokens (T5 appends EOS); a chat template
        # writes its own; a plain decoder prompt starts with BOS when the model has one (Llama base
        # models expect it) and must not end with anything the tokenizer would append.
        ids = self.tokenizer(texts, add_special_tokens=not self.decoder_only)["input_ids"]
        bos = self.tokenizer.bos_token_id
        if self.decoder_only and not self.use_chat_template and bos is not None:
            ids = [[bos] + row for row in ids]
        return ids

    def _answer_ids(self, answer: str) -> list[int]:
        if answer and self.decoder_only and not self.use_chat_template:
            answer = " " + answer  # continues "Answer:" as text would
        return self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]


def _window_spans(offsets: list[tuple[int, int]], budget: int, doc_stride: int) -> list[tuple[int, int]]:
    """Character spans of context windows of `budget` tokens, each overlapping the previous by `doc_stride`."""
    if not offsets:
        return [(0, 0)]
    spans, first = [], 0
    while True:
        last = min(first + budget, len(offsets)) - 1
        spans.append((offsets[first][0], offsets[last][1]))
        if last == len(offsets) - 1:
            return spans
        first = last + 1 - doc_stride


def _answer_in(example: SquadExample, first: int, end: int) -> str | None:
    """The first gold answer when this window holds all of it, else None."""
    if not example.answer_texts:
        return None
    start = example.answer_starts[0]
    if first <= start and start + len(example.answer_texts[0]) <= end:
        return example.answer_texts[0]
    return None
