"""The training loop on a tiny BERT: determinism, gradient accumulation, checkpoints, settings a resumed
run must keep. (Exact resume: tests/test_resume.py; learning with a real backbone: tests/test_learning.py.)"""
import json

import numpy as np
import pytest
import torch

import predict
import train
from conftest import VALIDATION_SAMPLE, one_line, sgd_run, tiny_args, training_state, weights
from data.batching import PadToLongest
from data.qa_features import SquadFeatures
from data.squad import SquadExamples
from engine.errors import UserError
from engine.optim import auto_learning_rate, auto_warmup_ratio

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@pytest.fixture(scope="module")
def run_a(tiny_run):
    """An uninterrupted run of 8 optimizer steps (the suite's shared tiny run)."""
    return tiny_run.output_dir


def test_evaluating_more_often_does_not_change_training(run_a, tiny_model_dir, tmp_path):
    """Evaluation draws nothing from the random stream that drives dropout."""
    output_dir = tmp_path / "often"
    train.main(tiny_args(tiny_model_dir, output_dir, "--eval-steps", "1"))
    a, b = weights(run_a / "latest"), weights(output_dir / "latest")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_same_settings_give_the_same_run(run_a, tiny_model_dir, tmp_path):
    """Determinism, which the resume test relies on: a second uninterrupted run matches bit for bit."""
    train.main(tiny_args(tiny_model_dir, tmp_path))
    a, b = weights(run_a / "latest"), weights(tmp_path / "latest")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_layout(run_a):
    for name in ("best", "latest"):
        directory = run_a / name
        for file in ("model.safetensors", "config.json", "run_config.json", *TOKENIZER_FILES):
            assert (directory / file).is_file(), f"{name}/{file} missing"
        run_config = json.loads((directory / "run_config.json").read_text())
        assert run_config["qa_style"] == "extractive"
        assert (run_config["max_seq_length"], run_config["doc_stride"]) == (384, 128)
        assert run_config["allow_null"] is False
    assert not (run_a / "best" / "training_state.pt").exists()  # model only
    state = training_state(run_a / "latest")
    assert state["state"]["step"] == 8
    assert set(state) >= {"optimizer", "scheduler", "rng", "state", "args"}
    results = json.loads((run_a / "results.json").read_text())
    assert results["steps"] == 8 and results["eval"]["total"] == 10
    assert 0 <= results["eval"]["f1"] <= 100 and 0 <= results["padding_share"] < 1
    predictions = json.loads((run_a / "predictions.json").read_text())
    eval_ids = [e.id for e in SquadExamples.load(str(VALIDATION_SAMPLE), max_samples=10).examples]
    assert sorted(predictions) == sorted(eval_ids)
    assert all(isinstance(v, str) and v for v in predictions.values())
    assert not list(run_a.glob("*.tmp")) and not list(run_a.glob("*.old"))


def test_tensorboard_compares_runs_by_their_settings(run_a):
    """The HParams dashboard gets the run's settings and its last and best F1; the parameter counts
    are text, not one-point charts."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.api_pb2 import Status
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    events = EventAccumulator(str(run_a / "tensorboard"))
    events.Reload()
    contents = {tag: HParamsPluginData.FromString(content) for tag, content in events.PluginTagToContent("hparams").items()}
    metrics = {info.name.tag for info in contents["_hparams_/experiment"].experiment.metric_infos}
    assert metrics == {"eval/f1", "best/f1", "train/mfu", "train/stopped_early_at_step"}
    settings = contents["_hparams_/session_start_info"].session_start_info.hparams
    assert settings["learning_rate"].number_value == 3e-4 and settings["task"].string_value == "qa"
    assert settings["precision"].string_value == "fp32" and settings["lora"].bool_value is False
    assert settings["global_batch"].number_value == 8 and settings["trainable_parameters"].number_value > 0
    assert contents["_hparams_/session_end_info"].session_end_info.status == Status.STATUS_SUCCESS
    scalars = set(events.Tags()["scalars"])
    assert {"eval/f1", "best/f1", "train/mfu"} <= scalars and not any(tag.startswith("model/") for tag in scalars)
    best = [event.value for event in events.Scalars("best/f1")]
    assert best == [max(best[:i + 1]) for i in range(len(best))]  # the best so far, at every evaluation

def test_best_checkpoint_loads_with_plain_transformers(run_a):
    """best/ is a standard Hugging Face model directory: the Auto classes load it without our code.

    (transformers 5 removed the "question-answering" pipeline, so the Auto classes are the standard way.)
    """
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    best = run_a / "best"
    model, info = AutoModelForQuestionAnswering.from_pretrained(str(best), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    saved = weights(best)
    parameters = dict(model.named_parameters())
    assert all(torch.equal(parameters[k], saved[k]) for k in saved if k in parameters)
    tokenizer = AutoTokenizer.from_pretrained(str(best))
    context = "The Amazon river flows through Brazil and empties into the Atlantic Ocean."
    inputs = tokenizer("Where does the Amazon empty?", context, return_tensors="pt", return_offsets_mapping=True)
    offsets = inputs.pop("offset_mapping")[0]
    with torch.no_grad():
        outputs = model(**inputs)
    assert outputs.start_logits.shape == outputs.end_logits.shape == inputs["input_ids"].shape
    context_tokens = [i for i, s in enumerate(inputs.sequence_ids(0)) if s == 1]
    start = max(context_tokens, key=lambda i: outputs.start_logits[0, i])
    answer = context[offsets[start][0] : offsets[start][1]]
    assert answer and answer in context


def test_resume_with_a_different_learning_rate_is_refused(run_a, tiny_model_dir):
    before, config = weights(run_a / "latest"), (run_a / "config.yaml").read_text()
    args = tiny_args(tiny_model_dir, run_a, "--resume", "--learning-rate", "1e-2")
    with pytest.raises(UserError, match="learning-rate") as error:
        train.main(args)
    one_line(error, "--learning-rate 0.0003 -> 0.01", str(run_a / "latest"))
    after = weights(run_a / "latest")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert (run_a / "config.yaml").read_text() == config  # the refused run's settings are not recorded


# The settings the previous version of train.py (before the run's settings were declared once, in
# engine/settings.py) saved in training_state.pt for `tiny_flags`, but for the paths.
PREVIOUS_VERSION_ARGS = {
    "config": None, "task": "qa", "qa_style": None, "dataset": None, "max_train_samples": 40, "max_eval_samples": 10,
    "max_seq_length": 384, "doc_stride": 128, "dataset_config": None, "block_size": None, "drop_last": False,
    "line_by_line": False, "text_field": "text", "validation_split": 0.1, "cache_dir": "outputs/token-cache",
    "group_by_length": False, "prompt_template": None, "no_answer_share": None, "max_answer_tokens": 32, "num_beams": 1,
    "freeze": "", "train_last_layers": None, "lora": False, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
    "lora_targets": None, "merge_lora": False, "gradient_checkpointing": None, "epochs": 3, "max_steps": 8,
    "batch_size": 4, "grad_accum_steps": 2, "learning_rate": 0.0003, "weight_decay": 0.01, "warmup_ratio": 0.1,
    "max_grad_norm": 1.0, "max_bad_steps": 5, "attention_dropout": 0.0, "seed": 42, "eval_steps": None,
    "eval_batch_size": 64, "eval_before_training": None, "n_best": 20, "max_answer_length": 30,
    "null_score_diff_threshold": None, "save_steps": 3, "log_steps": 2, "resume": None, "device": "cpu",
    "precision": "fp32", "attention": "auto", "compile": False, "fsdp": False, "global_batch": 8,
}


def test_a_checkpoint_of_the_previous_version_resumes(tiny_run, tiny_model_dir, tmp_path):
    """A default changed since (the warmup's) is refused by name; given as it was, the saved settings
    pass the resume check (the finished run has nothing left to do), and a trajectory setting that
    differs from them is still refused."""
    import shutil

    from conftest import SAMPLES
    from engine.checkpoint import load_run_config, write_manifest

    run = shutil.copytree(tiny_run.output_dir, tmp_path / "run")
    latest = run / "latest"

    def save_args(**changes):
        state = training_state(latest)
        state["args"] = {**PREVIOUS_VERSION_ARGS, "model": str(tiny_model_dir), "output_dir": str(run),
                         "train_file": str(SAMPLES / "squad_train.json"),
                         "validation_file": str(SAMPLES / "squad_validation.json"), **changes}
        torch.save(state, latest / "training_state.pt")
        write_manifest(latest, load_run_config(latest))

    # It warmed up over 10% of its steps: today's auto (20% for extractive QA) would change its course.
    argv = [*tiny_run.flags, "--output-dir", str(run), "--resume"]
    save_args()
    with pytest.raises(UserError) as error:
        train.main(argv)
    one_line(error, "--warmup-ratio 0.1 -> 0.2")
    argv += ["--warmup-ratio", "0.1"]
    with pytest.raises(UserError, match="nothing to do"):
        train.main(argv)
    save_args(seed=7)
    with pytest.raises(UserError) as error:
        train.main(argv)
    one_line(error, "cannot resume with different settings (--seed 7 -> 42)")
    # It trained with the model's own dropout: today's default (none) would change its course.
    save_args()
    with pytest.raises(UserError) as error:
        train.main([*argv, "--hidden-dropout", "0"])
    one_line(error, "--hidden-dropout auto -> 0.0")


@pytest.mark.parametrize("flag, value", [
    ("--batch-size", "2"), ("--seed", "7"), ("--max-seq-length", "256"),
    ("--max-grad-norm", "0.5"),  # clipping changes every update
    ("--max-train-samples", "30"),  # other training windows, other batches
])
def test_resume_with_other_trajectory_settings_is_refused(run_a, tiny_model_dir, flag, value):
    args = tiny_args(tiny_model_dir, run_a, "--resume")
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    with pytest.raises(UserError, match="different settings") as error:
        train.main(args)
    assert flag in str(error.value)


def test_resume_of_a_finished_run_has_nothing_to_do(run_a, tiny_model_dir):
    with pytest.raises(UserError, match="nothing to do"):
        train.main(tiny_args(tiny_model_dir, run_a, "--resume"))


def test_seeds_run_the_recipe_once_per_seed_and_summarise_the_spread(run_a, tiny_model_dir, tmp_path, capsys):
    """--seeds 42,7: seed-42/ is the plain run of seed 42 (the shared run), seed-7/ another; seeds.json
    holds the spread of the two runs' scores; again with --resume auto, nothing is trained again."""
    import statistics

    train.main(tiny_args(tiny_model_dir, tmp_path, "--seeds", "42,7"))
    a, b, other = (weights(d / "latest") for d in (run_a, tmp_path / "seed-42", tmp_path / "seed-7"))
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], other[k]) for k in a)
    f1 = [json.loads((tmp_path / f"seed-{seed}" / "results.json").read_text())["eval"]["f1"] for seed in ("42", "7")]
    summary = json.loads((tmp_path / "seeds.json").read_text())["scores"]["f1"]
    assert summary == {"mean": statistics.mean(f1), "min": min(f1), "max": max(f1), "std": statistics.stdev(f1),
                       "by_seed": {"42": f1[0], "7": f1[1]}}
    assert f"f1 over seeds 42, 7: mean {statistics.mean(f1):.4g}" in capsys.readouterr().out
    train.main(tiny_args(tiny_model_dir, tmp_path, "--seeds", "42,7", "--resume", "auto"))
    assert json.loads((tmp_path / "seeds.json").read_text())["scores"]["f1"] == summary
    with pytest.raises(UserError, match="--seeds 1,x: give distinct whole numbers"):
        train.main(tiny_args(tiny_model_dir, tmp_path, "--seeds", "1,x"))
    capsys.readouterr()
    train.main(tiny_args(tiny_model_dir, tmp_path / "dry", "--seeds", "42,7", "--dry-run"))  # one run's projection
    assert "--seeds 42,7: 2 runs like this one" in capsys.readouterr().out
    assert (tmp_path / "dry" / "dry_run.json").is_file() and not (tmp_path / "dry" / "seed-42").exists()


@pytest.fixture(scope="module")
def small_windows(tokenizer):
    from conftest import TRAIN_SAMPLE

    examples = SquadExamples.load(str(TRAIN_SAMPLE), max_samples=60).examples
    return SquadFeatures(examples, tokenizer, max_seq_length=64, doc_stride=16)


def accumulation_matches(model_dir, features, indices, kind="span", qa=None):
    collate = PadToLongest(features.pad_token_id, getattr(features, "padding_side", "right"))
    items = [features[i] for i in indices]
    accumulated, whole = sgd_run(model_dir, kind=kind, qa=qa), sgd_run(model_dir, kind=kind, qa=qa)
    # No clipping: it would hide a wrongly scaled gradient.
    step_a = train.train_step(accumulated, [collate(items[:4]), collate(items[4:])], max_grad_norm=1e9)
    step_w = train.train_step(whole, [collate(items)], max_grad_norm=1e9)
    assert step_a.loss == pytest.approx(step_w.loss, rel=1e-5) and step_a.grad_norm == pytest.approx(step_w.grad_norm, rel=1e-5)
    initial = dict(sgd_run(model_dir, kind=kind).model.named_parameters())
    after_a, after_w = dict(accumulated.model.named_parameters()), dict(whole.model.named_parameters())
    assert any(not torch.equal(after_a[k], initial[k]) for k in initial)
    for name in after_a:
        torch.testing.assert_close(after_a[name], after_w[name], atol=1e-6, rtol=0, msg=name)


def test_grad_accumulation_equals_one_big_batch(tiny_model_dir_no_dropout, small_windows):
    # Eight full windows (no padding anywhere), some holding the answer, some labelled CLS.
    full = np.flatnonzero(small_windows.lengths == 64)
    with_answer = [i for i in full if small_windows.start_positions[i] != small_windows.cls_index[i]]
    without = [i for i in full if small_windows.start_positions[i] == small_windows.cls_index[i]]
    indices = with_answer[:5] + without[:3]
    assert len(indices) == 8
    accumulation_matches(tiny_model_dir_no_dropout, small_windows, indices)


def test_grad_accumulation_with_different_window_lengths(tiny_model_dir_no_dropout, small_windows):
    # Real batches mix window lengths: 4 short windows, then 4 long ones. Padding a window further
    # (in the batch of 8) must not change its loss or gradient.
    lengths = small_windows.lengths
    short = [i for i in np.argsort(lengths, kind="stable") if lengths[i] < 56][:4]
    long = [i for i in np.flatnonzero(lengths == 64) if small_windows.start_positions[i] != small_windows.cls_index[i]][:4]
    assert len(short) == 4 and len(long) == 4
    accumulation_matches(tiny_model_dir_no_dropout, small_windows, short + long)


def squad_v2_file(directory):
    """Two answerable questions and an unanswerable one, in a SQuAD v2.0 file."""
    from conftest import squad_json, write_json

    context = "The lighthouse on the northern cape was built in 1874 by a team of twelve masons."
    qas = [
        {"id": "has-1", "question": "When was the lighthouse built?", "answers": [{"text": "1874", "answer_start": 49}]},
        {"id": "has-2", "question": "Who built it?", "answers": [{"text": "a team of twelve masons", "answer_start": 57}]},
        {"id": "no-1", "question": "Who painted the lighthouse?", "answers": [], "is_impossible": True},
    ]
    assert context[49:53] == "1874" and context[57:80] == "a team of twelve masons"
    return write_json(directory / "v2.json", squad_json([("Cape", [(context, qas)])], version="2.0"))


def test_squad_v2_run_reports_has_and_no_answer_scores(tmp_path, tiny_model_dir, capsys):
    """Unanswerable questions switch on the null answer, the scores split HasAns / NoAns, the best
    null threshold is searched and kept in the checkpoint, and predict.py answers with it."""
    data = squad_v2_file(tmp_path)
    output = tmp_path / "out"
    train.main(["--model", str(tiny_model_dir), "--train-file", str(data), "--validation-file", str(data),
                "--output-dir", str(output), "--max-steps", "2", "--precision", "fp32", "--device", "cpu"])
    scores = json.loads((output / "results.json").read_text())["eval"]
    assert (scores["HasAns_total"], scores["NoAns_total"], scores["total"]) == (2, 1, 3)
    weighted = (2 * scores["HasAns_f1"] + scores["NoAns_f1"]) / 3
    assert scores["f1"] == pytest.approx(weighted)
    assert scores["null_threshold"] == 0.0 and scores["best_f1"] >= scores["f1"]
    # Beside predictions.json, for the official script: "no answer" exactly where the odds exceed 0.
    answers = json.loads((output / "predictions.json").read_text())
    null_odds = json.loads((output / "null_odds.json").read_text())
    assert set(null_odds) == set(answers) == {"has-1", "has-2", "no-1"}
    assert all((answers[q] == "") == (null_odds[q] > 0.0) for q in answers)
    run_config = json.loads((output / "best" / "run_config.json").read_text())
    assert run_config["allow_null"] is True and run_config["null_threshold_given"] is False
    assert run_config["null_threshold"] == run_config["eval"]["best_f1_thresh"]

    # predict.py answers with the tuned threshold: on the validation file it scores the best F1.
    capsys.readouterr()
    predict.main(["--checkpoint", str(output), "--input", str(data), "--json", "--device", "cpu", "--precision", "fp32"])
    captured = capsys.readouterr()
    records = json.loads(captured.out)
    assert all((r["answer"] == "") == (r["null_score_diff"] > run_config["null_threshold"]) for r in records.values())
    assert f"F1 {run_config['eval']['best_f1']:.2f} on 3 questions" in captured.err
    predict.main(["--checkpoint", str(output), "--input", str(data), "--json", "--device", "cpu",
                  "--null-score-diff-threshold", "1e9"])
    assert all(r["answer"] for r in json.loads(capsys.readouterr().out).values())

    # A threshold given to train.py is the one evaluation scores with and the checkpoint keeps.
    given = tmp_path / "given"
    train.main(["--model", str(tiny_model_dir), "--train-file", str(data), "--validation-file", str(data),
                "--output-dir", str(given), "--max-steps", "1", "--precision", "fp32", "--device", "cpu",
                "--null-score-diff-threshold", "-2.5"])
    assert json.loads((given / "results.json").read_text())["eval"]["null_threshold"] == -2.5
    run_config = json.loads((given / "best" / "run_config.json").read_text())
    assert run_config["null_threshold"] == -2.5 and run_config["null_threshold_given"] is True


def test_a_resumed_v2_run_keeps_its_tuned_threshold_until_it_evaluates(tmp_path, tiny_model_dir):
    """A checkpoint saved between evaluations carries the last tuned threshold, so a resumed run must
    start from it (not from 0) to save the same checkpoints as an uninterrupted one."""
    from qa.task import QATask

    data = squad_v2_file(tmp_path)
    flags = ["--model", str(tiny_model_dir), "--train-file", str(data), "--validation-file", str(data)]
    saved = {"null_threshold": -1.25}
    assert QATask(train.parse_settings(flags), str(tiny_model_dir), saved).run_config["null_threshold"] == -1.25
    assert QATask(train.parse_settings(flags), str(tiny_model_dir), None).run_config["null_threshold"] == 0.0
    given = train.parse_settings([*flags, "--null-score-diff-threshold", "0.5"])
    assert QATask(given, str(tiny_model_dir), saved).run_config["null_threshold"] == 0.5


def test_evaluation_before_training_is_skipped_only_for_a_fresh_span_head(tiny_model_dir, tmp_path):
    """A backbone without a span head gets a random one: evaluating it first would measure nothing.
    A checkpoint with a trained head is evaluated first by default; the flag overrides both."""
    from transformers import BertForQuestionAnswering

    backbone = tmp_path / "backbone"
    BertForQuestionAnswering.from_pretrained(tiny_model_dir).bert.save_pretrained(backbone)
    for name in TOKENIZER_FILES:
        (backbone / name).write_bytes((tiny_model_dir / name).read_bytes())

    def initial_eval(model_dir, name, *flags):
        train.main([*tiny_args(model_dir, tmp_path / name), "--max-steps", "1", *flags])
        results = json.loads((tmp_path / name / "results.json").read_text())
        assert (tmp_path / name / "predictions_before_training.json").exists() == (results["initial_eval"] is not None)
        return results["initial_eval"]

    assert initial_eval(backbone, "fresh") is None
    assert initial_eval(backbone, "fresh-asked", "--eval-before-training")["total"] == 10
    assert initial_eval(tiny_model_dir, "trained")["total"] == 10
    assert initial_eval(tiny_model_dir, "trained-declined", "--no-eval-before-training") is None


def test_an_epoch_end_on_an_eval_step_evaluates_once_and_saves_the_next_epoch(tiny_model_dir, tmp_path, monkeypatch):
    """A checkpoint taken at an epoch's last step resumes in the next epoch: killed right after it,
    a run must not redo or skip the epoch's end."""
    evaluated_at = []
    real_evaluate = train.evaluate

    def evaluate(run):
        evaluated_at.append(run.state.step)
        return real_evaluate(run)

    monkeypatch.setattr(train, "evaluate", evaluate)
    # 40 windows in steps of 8: the first epoch ends at step 5, which --eval-steps 5 also names.
    train.main(tiny_args(tiny_model_dir, tmp_path, "--eval-steps", "5", "--save-steps", "100", "--max-steps", "5",
                         "--no-eval-before-training"))
    assert evaluated_at == [5]
    state = training_state(tmp_path / "latest")["state"]
    assert (state["step"], state["epoch"], state["batches_done"]) == (5, 1, 0)


@pytest.mark.parametrize("task, lora, parameters, expected", [
    ("qa", False, 22.7e6, 3e-4),    # MiniLM: the sweep's best
    ("clm", False, 134.5e6, 4e-4),  # SmolLM2-135M: the sweep's best
    ("qa", False, 134.5e6, 3e-5),   # generative QA with SmolLM2: not swept, the usual full fine-tuning rate
    ("clm", False, 1.2e9, 3e-5),
    ("qa", True, 250e6, 3e-4),      # LoRA trains few, freshly initialised weights
])
def test_auto_learning_rate_follows_the_sweep(task, lora, parameters, expected):
    assert auto_learning_rate(task, lora, parameters) == expected


def test_auto_warmup_is_chosen_by_model_kind_and_saved_as_chosen(tiny_run):
    """Extractive QA warms up over 20% of its steps, the other kinds 10% (engine/optim.py cites the
    seeds); the run records the value it used, so that a resume compares numbers, not `auto`."""
    assert [auto_warmup_ratio(kind) for kind in ("span", "seq2seq", "causal-lm")] == [0.2, 0.1, 0.1]
    results = json.loads((tiny_run.output_dir / "results.json").read_text())
    assert results["args"]["warmup_ratio"] == 0.2
    assert "\nwarmup_ratio: 0.2\n" in (tiny_run.output_dir / "config.yaml").read_text()
