"""Generative QA (seq2seq or decoder-only): the answer loss, batched generation, and the choice of
one answer per question across its context windows.

`GenerativeQA.answer_questions` is the one path from features to answers: evaluation in train.py
and predict.py both call it.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from data.batching import PadToLongest
from data.generative_features import GenerativeQAFeatures
from engine.device import to_device
from engine.distributed import is_sharded
from engine.inference import sharded_pass
from models.lm_head_loss import final_hidden_states, lm_head_loss


@dataclass(frozen=True)
class GeneratedAnswer:
    text: str  # empty: the model answered "no answer" (EOS alone)
    score: float  # mean log-probability per generated token, EOS included: comparable across lengths
    window: int  # the feature (context window) it was generated from

    def as_record(self) -> dict:
        return {"answer": self.text, "score": round(self.score, 4)}


class GenerativeQA:
    """`settings`: model_kind (seq2seq or causal-lm), prompt_template, max_seq_length, doc_stride,
    no_answer_share, max_answer_tokens, num_beams."""

    def __init__(self, tokenizer, settings: dict):
        self.tokenizer = tokenizer
        self.settings = settings
        self.decoder_only = settings["model_kind"] == "causal-lm"

    def features(self, examples, source: str, training: bool = False, seed: int = 0) -> GenerativeQAFeatures:
        s = self.settings
        return GenerativeQAFeatures(examples, self.tokenizer, s["prompt_template"], self.decoder_only, s["max_seq_length"],
                                    s["doc_stride"], training, s["no_answer_share"], seed, source)

    def collate(self, features: GenerativeQAFeatures) -> PadToLongest:
        return PadToLongest(features.pad_token_id, features.padding_side)

    def loss(self, model, batch: dict) -> torch.Tensor:
        """Summed cross-entropy over the answer tokens (EOS included) of the batch; the training loop
        normalises by the target tokens of the whole step."""
        labels = batch["labels"]
        if self.decoder_only:
            # The head runs in chunks and only where an answer token is predicted (models/lm_head_loss.py).
            mask = batch.get("attention_mask")  # none: no padding, positions from 0 on every row
            hidden = final_hidden_states(model, input_ids=batch["input_ids"], attention_mask=mask,
                                         position_ids=None if mask is None else position_ids(mask))
            # Each answer token is predicted from the position before it (the prompt comes first).
            return lm_head_loss(model, hidden, labels, batch["target_positions"], predicted_from=1)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=labels,
                       use_cache=False).logits
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")

    @staticmethod
    def count_targets(batch: dict) -> int:
        return len(batch["target_positions"])

    def answer_questions(self, model, features: GenerativeQAFeatures, device, precision: str, batch_size: int):
        """The best generated answer of every example, by question id (under torchrun: on rank 0; the
        other processes get None)."""
        answers = self.generate(model, features, device, precision, batch_size)
        return None if answers is None else choose_answers(features, answers)

    def generate(self, model, features: GenerativeQAFeatures, device, precision: str, batch_size: int) -> list[GeneratedAnswer] | None:
        """An answer for every window, in feature order; under torchrun each process generates for a
        share of the batches and rank 0 gets them all (the others None)."""
        eos = self.tokenizer.eos_token_id
        # A sharded (FSDP) model must run as many forward passes on every process: generation then
        # goes on to the longest answer of any process.
        synced = is_sharded(model)

        def step(model, batch):
            prompts = to_device({key: batch[key] for key in ("input_ids", "attention_mask")}, device)
            output = model.generate(
                **prompts,
                max_new_tokens=self.settings["max_answer_tokens"], num_beams=self.settings["num_beams"],
                do_sample=False, eos_token_id=eos, pad_token_id=features.pad_token_id,
                output_scores=True, return_dict_in_generate=True, synced_gpus=synced,
            )
            return token_log_probabilities(model, output, self.settings["num_beams"])

        passes = sharded_pass(model, features, features.lengths, batch_size, self.collate(features), device, precision,
                              step, "generate")
        if passes is None:
            return None
        answers: list[GeneratedAnswer | None] = [None] * len(features)
        for windows, (tokens, logprobs) in passes:
            for window, generated, token_logprobs in zip(windows, tokens.tolist(), logprobs.float().tolist()):
                length = generated.index(eos) + 1 if eos in generated else len(generated)
                text = self.tokenizer.decode(generated[:length], skip_special_tokens=True).strip()
                answers[window] = GeneratedAnswer(text, sum(token_logprobs[:length]) / length, window)
        return answers


def token_log_probabilities(model, output, num_beams: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The generated tokens `[rows, steps]` and the log-probability of each. Greedy search returns
    each step's logits: normalised and read at the chosen token here, on the device (transformers'
    `compute_transition_scores` would make the host wait to size its beams). Beam search returns
    log-probabilities per beam, which that function follows back."""
    tokens = output.sequences[:, -len(output.scores) :]
    if num_beams == 1:
        logits = torch.stack(output.scores, dim=1).float()
        return tokens, logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    logprobs = model.compute_transition_scores(output.sequences, output.scores, output.beam_indices)
    return output.sequences[:, -logprobs.shape[1] :], logprobs


def choose_answers(features: GenerativeQAFeatures, candidates: list[GeneratedAnswer]) -> dict[str, GeneratedAnswer]:
    """One answer per question from the answers of its windows: a non-empty answer beats "no
    answer" (a window that misses the answer should say nothing), then the higher mean
    log-probability wins, whatever the windows' order."""
    best: dict[str, GeneratedAnswer] = {}
    for candidate in candidates:
        qid = features.examples[features.example_index[candidate.window]].id
        current = best.get(qid)
        if current is None or (bool(candidate.text), candidate.score) > (bool(current.text), current.score):
            best[qid] = candidate
    return best


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on each row's first real token, as generation computes them for
    left-padded prompts: training and generation then see the same positions."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)
