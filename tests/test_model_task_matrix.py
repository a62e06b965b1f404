"""Every model on every task: each shipped and tiny test model with each task and QA style either
trains or stops with one error line saying why that model cannot, and which kind of model can."""
import pytest
import torch

import train
from engine.errors import UserError

TASKS = {  # name: train.py flags
    "qa extractive": ["--task", "qa", "--qa-style", "extractive"],
    "qa generative": ["--task", "qa", "--qa-style", "generative"],
    "clm": ["--task", "clm", "--block-size", "32"],
}
# What each model kind cannot do, and what the error line says instead; every other pairing trains.
REFUSED = {
    ("encoder", "qa generative"): "encoder-only model, which cannot generate answers; use an encoder-decoder",
    ("encoder", "clm"): "needs a decoder-only one",
    ("encoder-decoder", "clm"): "needs a decoder-only one",
}


def one_step(argv: list[str], tmp_path):
    """train.py's setup and one training step: what decides whether a model can do a task."""
    args = train.parse_settings([*argv, "--device", "cpu", "--precision", "fp32", "--output-dir", str(tmp_path / "out"),
                             "--cache-dir", str(tmp_path / "cache"), "--max-steps", "1", "--batch-size", "2"])
    run = train.setup(args, torch.device("cpu"))
    micro_batches, _ = train.micro_batches_of_step(run, run.batches.for_epoch(0)[0])
    return train.train_step(run, micro_batches, args.max_grad_norm)


def check(kind: str, task: str, argv: list[str], tmp_path) -> None:
    refusal = REFUSED.get((kind, task))
    if refusal is None:
        assert torch.isfinite(torch.tensor(one_step(argv, tmp_path).loss))
        return
    with pytest.raises(UserError) as error:
        one_step(argv, tmp_path)
    assert refusal in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("kind", ["encoder", "encoder-decoder", "decoder"])
def test_tiny_models(kind, task, tmp_path, tiny_model_dir, tiny_t5_dir, tiny_llama_dir):
    model = {"encoder": tiny_model_dir, "encoder-decoder": tiny_t5_dir, "decoder": tiny_llama_dir}[kind]
    check(kind, task, ["--model", str(model), *TASKS[task]], tmp_path)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("alias, kind", [("minilm-l6", "encoder"), ("smollm2-135m", "decoder")])
def test_shipped_models(alias, kind, task, tmp_path):
    # Short windows: whether a model can do a task does not depend on their length.
    check(kind, task, ["--model", alias, *TASKS[task], "--max-train-samples", "4", "--max-eval-samples", "2",
                       "--max-seq-length", "128", "--doc-stride", "32"]
          if task != "clm" else ["--model", alias, *TASKS[task]], tmp_path)
