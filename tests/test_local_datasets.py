"""train.py --dataset DIR: datasets written with the real `datasets` library (save_to_disk, folders of
Parquet, JSON Lines or CSV files), for both tasks, read offline; predict.py --dataset on a causal LM."""
import json

import pytest

import train
from conftest import PREDICT_FLAGS, VALIDATION_SAMPLE, predict_output, tiny_args
from data.squad import SquadExamples


def sample_records() -> list[dict]:
    """The shipped SQuAD sample's first questions as flat records, the Hub `squad` layout."""
    return [{"id": e.id, "title": e.title or "", "context": e.context, "question": e.question,
             "answers": {"text": list(e.answer_texts), "answer_start": list(e.answer_starts)}}
            for e in SquadExamples.load(str(VALIDATION_SAMPLE), max_samples=24).examples]


@pytest.mark.parametrize("form", ["save_to_disk", "parquet"])
def test_qa_trains_on_a_local_dataset(tiny_model_dir, tmp_path, form):
    import datasets

    records = sample_records()
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(records[:16]),
                                   "validation": datasets.Dataset.from_list(records[16:])})
    directory = tmp_path / "squad-like"
    if form == "save_to_disk":
        splits.save_to_disk(str(directory))
    else:
        directory.mkdir()
        for name, split in splits.items():
            split.to_parquet(str(directory / f"{name}.parquet"))
    output = tmp_path / "out"
    train.main([*tiny_args(tiny_model_dir, output), "--dataset", str(directory), "--max-steps", "2"])
    results = json.loads((output / "results.json").read_text())
    assert results["steps"] == 2 and results["eval"]["total"] == len(records) - 16


@pytest.mark.parametrize("form", ["csv", "jsonl"])
def test_clm_trains_on_a_folder_of_files(tiny_llama_dir, tmp_path, form):
    import datasets

    text = [f"The river number {i} flows past the old mill and into the sea near the town." for i in range(40)]
    directory = tmp_path / "texts"
    directory.mkdir()
    for name, rows in (("train", text[:32]), ("validation", text[32:])):
        table = datasets.Dataset.from_dict({"text": rows})
        if form == "csv":
            table.to_csv(str(directory / f"{name}.csv"), index=False)
        else:
            table.to_json(str(directory / f"{name}.jsonl"), lines=True)
    output = tmp_path / "out"
    train.main(["--task", "clm", "--model", str(tiny_llama_dir), "--dataset", str(directory), "--block-size", "32",
                "--max-steps", "2", "--device", "cpu", "--precision", "fp32", "--output-dir", str(output),
                "--cache-dir", str(tmp_path / "cache")])
    results = json.loads((output / "results.json").read_text())
    assert results["steps"] == 2 and results["eval"]["tokens"] > 0
    # predict.py scores the validation split as the run's final evaluation did
    out, _ = predict_output("--checkpoint", output, "--dataset", directory, "--json", "--cache-dir", tmp_path / "cache",
                            *PREDICT_FLAGS)
    scores = json.loads(out)
    assert scores["tokens"] == results["eval"]["tokens"]
    assert scores["loss"] == pytest.approx(results["eval"]["loss"], rel=1e-6)
