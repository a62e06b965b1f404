"""Hub names proven offline: a Hugging Face cache laid out as huggingface_hub and datasets leave a
download (tiny BERT, T5 and Llama with their tokenizers; a SQuAD-format and a text dataset), then,
with HF_HUB_OFFLINE=1, train.py --model ORG/NAME (and --dataset ORG/NAME) for each task and
predict.py on what it wrote, so that the path a networked user takes (the name resolved through
refs/main to its snapshot, a LoRA base model found again by its name) runs here. One process runs
them all: the libraries read HF_HOME and HF_HUB_OFFLINE once, when they are imported."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import GENERATIVE_RUN_FLAGS, PREDICT_FLAGS, ROOT, TRAIN_SAMPLE, SAMPLES

COMMIT, OLDER_COMMIT = "1" * 40, "0" * 40
CONTEXT = "The Amazon river flows through Brazil and empties into the Atlantic Ocean near the city of Belem."
QUESTION = "Where does the Amazon empty?"
FAST = ["--max-steps", "2", "--save-steps", "1000", "--eval-batch-size", "8", *PREDICT_FLAGS]


def cache_model(hub: Path, repo_id: str, model_dir: Path) -> None:
    """`model_dir`'s files stored as huggingface_hub stores a downloaded revision: the content in
    blobs/, the snapshot of the commit that refs/main names made of links to them. An older
    snapshot beside it holds a configuration that cannot load: the name must resolve through refs/main."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for file in sorted(model_dir.iterdir()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    older = repo / "snapshots" / OLDER_COMMIT
    older.mkdir()
    (older / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))


def cache_dataset(home: Path, repo_id: str, splits: dict[str, list[dict]], work: Path) -> None:
    """The dataset as `datasets` keeps one it downloaded and prepared (which it finds again offline):
    Arrow files named after the dataset under HF_HOME/datasets/ORG___NAME/default/0.0.0/HASH."""
    import datasets

    files = {}
    for split, records in splits.items():
        files[split] = work / f"{repo_id.replace('/', '-')}-{split}.jsonl"
        files[split].write_text("\n".join(json.dumps(record) for record in records))
    builder = datasets.load_dataset_builder("json", data_files={k: str(v) for k, v in files.items()},
                                            cache_dir=str(work / "prepared"))
    builder.download_and_prepare()
    name = repo_id.split("/")[1]
    target = home / "datasets" / repo_id.replace("/", "___") / "default" / "0.0.0" / Path(builder.cache_dir).name
    shutil.copytree(builder.cache_dir, target)
    for arrow in target.glob("json-*.arrow"):
        arrow.rename(target / arrow.name.replace("json-", f"{name}-", 1))


def squad_records(path: Path) -> list[dict]:
    document = json.loads(path.read_text())
    return [{"id": q["id"], "title": article["title"], "context": p["context"], "question": q["question"],
             "answers": {"text": [a["text"] for a in q["answers"]], "answer_start": [a["answer_start"] for a in q["answers"]]}}
            for article in document["data"] for p in article["paragraphs"] for q in p["qas"]]


@pytest.fixture(scope="module")
def hub_runs(tmp_path_factory, tiny_model_dir, tiny_t5_dir, tiny_llama_dir):
    """Every run and prediction, in one offline process; (its stdout, the runs' directory)."""
    home, runs = tmp_path_factory.mktemp("hf-home"), tmp_path_factory.mktemp("hub-runs")
    for repo_id, model_dir in (("tiny-org/tiny-bert", tiny_model_dir), ("tiny-org/tiny-t5", tiny_t5_dir),
                               ("tiny-org/tiny-llama", tiny_llama_dir)):
        cache_model(home / "hub", repo_id, model_dir)
    squad = squad_records(TRAIN_SAMPLE)
    cache_dataset(home, "tiny-org/tiny-squad", {"train": squad[:24], "validation": squad[24:32]}, runs)
    paragraphs = (SAMPLES / "text_sample.txt").read_text(encoding="utf-8").split("\n\n")
    cache_dataset(home, "tiny-org/tiny-text", {"train": [{"text": p} for p in paragraphs[:-3]],
                                                "validation": [{"text": p} for p in paragraphs[-3:]]}, runs)
    script = f"""
import json, sys
import predict, train
runs = {str(runs)!r}
train.main(["--model", "tiny-org/tiny-bert", "--dataset", "tiny-org/tiny-squad", "--batch-size", "4",
            "--output-dir", runs + "/bert", *{FAST!r}])
predict.main(["--checkpoint", runs + "/bert", "--context", {CONTEXT!r}, "--question", {QUESTION!r}, "--json", *{PREDICT_FLAGS!r}])
train.main(["--model", "tiny-org/tiny-t5", "--train-file", {str(TRAIN_SAMPLE)!r}, "--validation-file", {str(TRAIN_SAMPLE)!r},
            "--output-dir", runs + "/t5", *{GENERATIVE_RUN_FLAGS!r}, *{FAST!r}])
predict.main(["--checkpoint", runs + "/t5", "--context", {CONTEXT!r}, "--question", {QUESTION!r}, "--json", *{PREDICT_FLAGS!r}])
train.main(["--task", "clm", "--model", "tiny-org/tiny-llama", "--dataset", "tiny-org/tiny-text", "--lora",
            "--block-size", "32", "--cache-dir", runs + "/tokens", "--output-dir", runs + "/llama", *{FAST!r}])
predict.main(["--checkpoint", runs + "/llama", "--prompt", "The river", "--max-new-tokens", "4", "--seed", "1",
              *{PREDICT_FLAGS!r}])
"""
    environment = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                   "TRANSFORMERS_OFFLINE": "1"}
    environment.pop("HF_HUB_CACHE", None)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=environment, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-5000:]
    return done.stdout, runs


def test_hub_names_train_and_predict_offline_from_the_cache(hub_runs):
    out, runs = hub_runs
    for name, model in (("bert", "tiny-org/tiny-bert"), ("t5", "tiny-org/tiny-t5"), ("llama", "tiny-org/tiny-llama")):
        results = json.loads((runs / name / "results.json").read_text())
        assert results["steps"] == 2, name
        assert f"model: {model}" in (runs / name / "config.yaml").read_text(), name
    # The LoRA checkpoint names its base model by the Hub name, which predict.py found again offline.
    assert json.loads((runs / "llama" / "best" / "run_config.json").read_text())["base_model"] == "tiny-org/tiny-llama"
    assert (runs / "llama" / "best" / "adapter_model.safetensors").is_file()
    extractive, generated = split_records(out)
    assert extractive["answer"] and CONTEXT[extractive["start"]:extractive["end"]] == extractive["answer"]
    assert set(generated) == {"answer", "score", "start", "end"}


def split_records(out: str) -> tuple[dict, dict]:
    """The two JSON answers predict.py printed among the runs' lines."""
    decoder, records, position = json.JSONDecoder(), [], 0
    while (start := out.find("{\n", position)) >= 0:
        record, position = decoder.raw_decode(out, start)
        records.append(record)
    return records[0], records[1]
