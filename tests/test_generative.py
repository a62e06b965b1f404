"""Generative QA: prompts and labels, context windows, answer choice across windows, batched
generation, the token-normalised loss, and a tiny T5 that learns to answer."""
import copy
import json

import numpy as np
import pytest
import torch
from conftest import PREDICT_FLAGS, VALIDATION_SAMPLE, predict_output, squad_json
from test_training import accumulation_matches

import train
from data.batching import PadToLongest
from data.generative_features import DECODER_TEMPLATE, SEQ2SEQ_TEMPLATE, GenerativeQAFeatures
from data.squad import SquadExample, SquadExamples
from models.backbones import load_model
from qa.generative import GeneratedAnswer, GenerativeQA, choose_answers
from qa.metrics import squad_scores

CONTEXT = "The Panama Canal opened in 1914 after ten years of work by thousands of labourers."
EXAMPLE = SquadExample("canal", "", CONTEXT, "When did the canal open?", ("1914",), (CONTEXT.index("1914"),))


def settings(kind: str, **overrides) -> dict:
    base = {"model_kind": kind, "prompt_template": SEQ2SEQ_TEMPLATE if kind == "seq2seq" else DECODER_TEMPLATE,
            "max_seq_length": 384, "doc_stride": 128, "no_answer_share": 0.0, "max_answer_tokens": 8, "num_beams": 1}
    return {**base, **overrides}


@pytest.fixture
def chat_tokenizer(tiny_tokenizer):
    """The tiny tokenizer with a chat template, and EOS doubling as the pad token (as in SmolLM2)."""
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@pytest.mark.parametrize("kind", ["causal-lm", "seq2seq"])
def test_labels_are_the_answer_and_eos_and_mask_the_prompt(tiny_tokenizer, kind):
    features = GenerativeQAFeatures([EXAMPLE], tiny_tokenizer, settings(kind)["prompt_template"], kind == "causal-lm",
                                    training=True)
    (ids,), (labels,) = features.input_ids, features.labels
    eos = tiny_tokenizer.eos_token_id
    targets = [t for t in labels if t != -100]
    assert targets[-1] == eos
    assert tiny_tokenizer.decode(targets[:-1]).strip() == "1914"
    if kind == "causal-lm":
        prompt_length = labels.index(targets[0])
        assert labels[:prompt_length] == [-100] * prompt_length  # exactly the prompt is masked ...
        assert ids[prompt_length:] == targets  # ... and the rest of the sequence is the answer
        prompt = tiny_tokenizer.decode(ids[:prompt_length])
        assert prompt.endswith("Answer:") and "When did the canal open?" in prompt and CONTEXT in prompt
    else:
        assert -100 not in labels  # the decoder sees only the answer
        assert tiny_tokenizer.decode(ids) == f"question: When did the canal open? context: {CONTEXT}</s>"


def test_a_plain_decoder_prompt_starts_with_bos_when_the_model_has_one(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.bos_token = "<unk>"  # any existing special token will do as a stand-in
    features = GenerativeQAFeatures([EXAMPLE], tokenizer, DECODER_TEMPLATE, True, training=True)
    without = GenerativeQAFeatures([EXAMPLE], tiny_tokenizer, DECODER_TEMPLATE, True, training=True)
    assert features.input_ids[0] == [tokenizer.bos_token_id] + without.input_ids[0]
    assert features.labels[0] == [-100] + without.labels[0]


def test_eos_stays_a_target_when_it_is_the_pad_token(chat_tokenizer):
    """Pad == EOS (SmolLM2): left padding must be masked, the answer's EOS must not."""
    other = SquadExample("q2", "", CONTEXT, "How long did the work take?", ("ten years",), (CONTEXT.index("ten years"),))
    features = GenerativeQAFeatures([EXAMPLE, other], chat_tokenizer, DECODER_TEMPLATE, True, training=True)
    assert features.use_chat_template and features.pad_token_id == chat_tokenizer.eos_token_id
    prompt = chat_tokenizer.decode(features.input_ids[0])
    assert prompt.startswith("<|user|>Context: ") and "<|assistant|>1914</s>" in prompt
    batch = PadToLongest(features.pad_token_id, features.padding_side)([features[0], features[1]])
    eos = chat_tokenizer.eos_token_id
    for row, feature in enumerate((features[0], features[1])):
        padding = batch["input_ids"].shape[1] - len(feature["input_ids"])
        assert batch["attention_mask"][row, :padding].sum() == 0 and batch["labels"][row, :padding].eq(-100).all()
        assert batch["labels"][row, -1] == eos and batch["input_ids"][row, -1] == eos
        assert batch["labels"][row, padding:].tolist() == feature["labels"]
    assert GenerativeQA.count_targets(batch) == sum(len([t for t in f["labels"] if t != -100]) for f in (features[0], features[1]))


LONG_CONTEXT = " ".join(f"Sentence number {i} is about the river." for i in range(40)) + " The bridge opened in 1931."


def long_example() -> SquadExample:
    return SquadExample("long", "", LONG_CONTEXT, "When did the bridge open?", ("1931",), (LONG_CONTEXT.index("1931"),))


def test_long_contexts_are_cut_into_overlapping_windows(tiny_tokenizer):
    features = GenerativeQAFeatures([long_example()], tiny_tokenizer, SEQ2SEQ_TEMPLATE, False, max_seq_length=96,
                                    doc_stride=24)
    spans = features.window_chars
    assert len(spans) > 3
    assert spans[0, 0] == 0 and spans[-1, 1] == len(LONG_CONTEXT)
    assert all(spans[i + 1, 0] < spans[i, 1] for i in range(len(spans) - 1))  # consecutive windows overlap
    assert max(features.lengths) <= 96 + 2  # re-tokenising a window's edge may merge differently
    for (first, end), ids in zip(spans, features.input_ids):
        assert LONG_CONTEXT[first:end] in tiny_tokenizer.decode(ids)


def test_training_keeps_answer_windows_and_a_share_of_the_others(tiny_tokenizer):
    kwargs = dict(template=SEQ2SEQ_TEMPLATE, decoder_only=False, max_seq_length=96, doc_stride=24, training=True)
    every_window = GenerativeQAFeatures([long_example()], tiny_tokenizer, **kwargs, no_answer_share=1.0)
    only_answer = GenerativeQAFeatures([long_example()], tiny_tokenizer, **kwargs, no_answer_share=0.0)
    eos = tiny_tokenizer.eos_token_id
    answers = [tiny_tokenizer.decode(labels[:-1]) for labels in every_window.labels]
    assert all(labels[-1] == eos for labels in every_window.labels)
    with_answer = [i for i, text in enumerate(answers) if text]
    assert len(with_answer) >= 1 and {answers[i] for i in with_answer} == {"1931"}
    assert all(every_window.labels[i] == [eos] for i in range(len(answers)) if i not in with_answer)
    assert [tiny_tokenizer.decode(labels[:-1]) for labels in only_answer.labels] == ["1931"] * len(with_answer)


def test_the_best_scoring_window_answer_wins(tiny_tokenizer):
    features = GenerativeQAFeatures([long_example(), EXAMPLE], tiny_tokenizer, SEQ2SEQ_TEMPLATE, False,
                                    max_seq_length=96, doc_stride=24)
    windows = np.flatnonzero(features.example_index == 0)
    assert len(windows) >= 3
    scores = [-2.0, -0.3, -1.0] + [-5.0] * (len(windows) - 3)
    candidates = [GeneratedAnswer(f"answer {w}", s, int(w)) for w, s in zip(windows, scores)]
    candidates.append(GeneratedAnswer("", -0.01, int(np.flatnonzero(features.example_index == 1)[0])))
    for order in (candidates, candidates[::-1]):  # not "last window wins"
        chosen = choose_answers(features, order)
        assert chosen["long"].text == f"answer {windows[1]}" and chosen["canal"].text == ""
    # A confident "no answer" from a window that misses the answer loses to any answer.
    with_empty = candidates + [GeneratedAnswer("", -0.001, int(windows[0]))]
    assert choose_answers(features, with_empty)["long"].text == f"answer {windows[1]}"


@pytest.mark.parametrize("kind, fixture", [("causal-lm", "tiny_llama_dir"), ("seq2seq", "tiny_t5_dir")])
def test_batched_generation_equals_one_at_a_time(request, tiny_tokenizer, kind, fixture):
    """Left padding (decoder-only) and right padding (seq2seq) must not change any answer or score."""
    model = load_model(str(request.getfixturevalue(fixture)), kind)
    qa = GenerativeQA(tiny_tokenizer, settings(kind, max_seq_length=160, doc_stride=32, max_answer_tokens=6))
    examples = SquadExamples.load(str(VALIDATION_SAMPLE), max_samples=6).examples + [long_example()]
    features = qa.features(examples, "test")
    assert len(set(features.lengths)) > 1  # batches really are padded
    batched = qa.generate(model, features, torch.device("cpu"), "fp32", batch_size=16)
    single = qa.generate(model, features, torch.device("cpu"), "fp32", batch_size=1)
    assert [a.text for a in batched] == [a.text for a in single]
    assert [a.window for a in batched] == list(range(len(features)))
    np.testing.assert_allclose([a.score for a in batched], [a.score for a in single], atol=1e-4)


@pytest.mark.parametrize("kind, fixture", [("causal-lm", "tiny_llama_dir"), ("seq2seq", "tiny_t5_dir")])
def test_grad_accumulation_normalises_by_answer_tokens(request, tiny_tokenizer, kind, fixture):
    """Two micro-batches of unequal answer lengths give the same update as one batch of all eight."""
    qa = GenerativeQA(tiny_tokenizer, settings(kind, max_seq_length=160, doc_stride=32))
    features = qa.features(SquadExamples.load(str(VALIDATION_SAMPLE), max_samples=20).examples, "test", training=True)
    answer_tokens = [sum(t != -100 for t in labels) for labels in features.labels]
    order = np.argsort(answer_tokens, kind="stable")
    indices = [int(i) for i in (*order[:4], *order[-4:])]  # short answers first, long ones second
    assert sum(answer_tokens[i] for i in indices[:4]) < sum(answer_tokens[i] for i in indices[4:])
    accumulation_matches(request.getfixturevalue(fixture), features, indices, kind=kind, qa=qa)


def squad_file(path, examples, copies: int = 1):
    """`examples` as a SQuAD JSON file, each `copies` times (its copies' ids suffixed)."""
    paragraphs = [(e.context, [{"id": f"{e.id}-{copy}" if copies > 1 else e.id, "question": e.question,
                                "answers": [{"text": t, "answer_start": s} for t, s in zip(e.answer_texts, e.answer_starts)]}])
                  for copy in range(copies) for e in examples]
    path.write_text(json.dumps(squad_json([("t", paragraphs)])))
    return path


def test_tiny_t5_learns_to_answer_and_predict_reuses_it(tmp_path, tiny_t5_dir):
    """12 sample questions, trained and evaluated on the same questions: EM rises from the untrained
    model's to well above it, and predict.py answers from the checkpoint as evaluation did. The
    training file holds the 12 ten times: an epoch of 30 steps, so that the run evaluates (as it does
    at each epoch's end) 7 times, not 67."""
    examples = SquadExamples.load(str(VALIDATION_SAMPLE), max_samples=12)
    output = tmp_path / "run"
    flags = ["--model", tiny_t5_dir, "--train-file", squad_file(tmp_path / "train.json", examples.examples, copies=10),
             "--validation-file", VALIDATION_SAMPLE, "--max-eval-samples", "12", "--max-seq-length", "128",
             "--doc-stride", "32", "--max-steps", "200", "--batch-size", "4", "--learning-rate", "1e-2",
             "--warmup-ratio", "0.05", "--device", "cpu", "--precision", "fp32", "--output-dir", output]
    train.main([str(f) for f in flags])
    results = json.loads((output / "results.json").read_text())
    print(f"untrained EM {results['initial_eval']['exact_match']:.1f}, trained EM {results['eval']['exact_match']:.1f}")
    assert results["eval"]["exact_match"] >= results["initial_eval"]["exact_match"] + 40
    config = json.loads((output / "best" / "run_config.json").read_text())
    assert config["qa_style"] == "generative" and config["model_kind"] == "seq2seq"

    questions = squad_file(tmp_path / "questions.json", examples.examples)
    # latest/ is the model of the last evaluation, whose answers predictions.json holds; in its precision
    # (predict.py's auto may be bf16 on this CPU, where near-tied answers of a tiny model can flip).
    predict_output("--checkpoint", output / "latest", "--input", questions, "--output", tmp_path / "p.json",
                   *PREDICT_FLAGS)
    answers = json.loads((tmp_path / "p.json").read_text())
    assert answers == json.loads((output / "predictions.json").read_text())
    assert squad_scores(answers, examples.examples)["exact_match"] == pytest.approx(results["eval"]["exact_match"])
