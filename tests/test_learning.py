"""The one run with a real backbone: fine-tuning MiniLM on the shipped sample teaches it to answer.
In a file of its own, the longest the suite has: pytest.ini's workers start it first (conftest.py)."""
import json

import torch
from conftest import VALIDATION_SAMPLE

import train
from data.qa_features import SquadFeatures
from data.squad import SquadExamples
from models.backbones import load_model
from qa.extractive import ExtractiveQA
from qa.metrics import squad_scores


def test_training_teaches_minilm_to_answer(tmp_path, minilm_path, tokenizer):
    """The one run with the real backbone: one epoch on the shipped sample must beat the untrained
    model clearly (measured with today's defaults on a 2-core AMD EPYC with AVX2: F1 4.9 untrained,
    25.8 after the epoch)."""
    examples = SquadExamples.load(str(VALIDATION_SAMPLE)).examples
    settings = {"max_seq_length": 384, "doc_stride": 128, "n_best": 20, "max_answer_length": 30,
                "allow_null": False, "null_threshold": 0.0}
    torch.manual_seed(42)  # the fresh span head is initialised as in train.py
    untrained = load_model(minilm_path, "span")
    features = SquadFeatures(examples, tokenizer, settings["max_seq_length"], settings["doc_stride"])
    predictions = ExtractiveQA(tokenizer, settings).answer_questions(untrained, features, torch.device("cpu"), "fp32", 64)
    untrained_f1 = squad_scores({k: p.text for k, p in predictions.items()}, examples)["f1"]
    del untrained

    train.main(["--epochs", "1", "--precision", "fp32", "--device", "cpu", "--output-dir", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    print(f"untrained F1 {untrained_f1:.2f}, trained F1 {results['eval']['f1']:.2f} (best {results['best_checkpoint_f1']:.2f})")
    assert results["eval"]["total"] == len(examples)
    assert results["eval"]["f1"] >= untrained_f1 + 8
