"""Transfer learning on the tiny T5 and Llama: which parameters --freeze / --train-last-layers leave
trainable, that training moves only those, one-line errors for impossible freezing, and LoRA
(adapter checkpoints, --merge-lora, reloading with predict.py). (Exact resume: tests/test_resume.py.)"""
import json
from pathlib import Path

import pytest
import torch

import train
from conftest import (GENERATIVE_RUN_FLAGS as SMALL, PREDICT_FLAGS, VALIDATION_SAMPLE,
                      one_step_generative_errors, predict_output, squad_json, write_json)
from models.backbones import load_model
from models.transfer import freeze


# Every name under which T5 holds its token embedding matrix or its LM head (transformers ties them
# all to one tensor; with an untied head, lm_head.weight would be a second tensor).
T5_EMBEDDINGS_AND_HEAD = {"shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"}
T5_LAST_BLOCKS_AND_NORMS = ("encoder.block.1.", "decoder.block.1.", "encoder.final_layer_norm.", "decoder.final_layer_norm.")


def t5_trains_with_last_layer(name: str) -> bool:
    """The rule for --freeze encoder,decoder --train-last-layers 1 on a 2+2-block T5: the last block
    and the final norm of each stack, and the embeddings and head (not frozen), train."""
    return name.startswith(T5_LAST_BLOCKS_AND_NORMS) or name in T5_EMBEDDINGS_AND_HEAD


def names(model) -> list[str]:
    """Every parameter name, tied ones under each of their names."""
    return [name for name, _ in model.named_parameters(remove_duplicate=False)]


def trainable_names(model) -> set[str]:
    return {name for name, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}


# --- freeze() on the models themselves ---

def test_freeze_stacks_but_train_the_last_block(tiny_t5_dir):
    model = load_model(str(tiny_t5_dir), "seq2seq")
    assert len(model.encoder.block) == len(model.decoder.block) == 2  # so block 1 is the last one
    all_names = names(model)
    assert T5_EMBEDDINGS_AND_HEAD <= set(all_names)
    assert all(any(n.startswith(prefix) for n in all_names) for prefix in T5_LAST_BLOCKS_AND_NORMS)

    freeze(model, ["encoder", "decoder"], 1)

    expected = {name for name in all_names if t5_trains_with_last_layer(name)}
    assert trainable_names(model) == expected
    frozen = set(all_names) - expected
    assert any(n.startswith("encoder.block.0.") for n in frozen) and any(n.startswith("decoder.block.0.") for n in frozen)


def test_freeze_embeddings_of_t5_freezes_only_the_embedding_matrix(tiny_t5_dir):
    model = load_model(str(tiny_t5_dir), "seq2seq")
    embedding_matrix = model.shared.weight
    tied_to_it = {name for name, p in model.named_parameters(remove_duplicate=False) if p is embedding_matrix}
    assert "shared.weight" in tied_to_it

    freeze(model, ["embeddings"], None)

    frozen = set(names(model)) - trainable_names(model)
    assert frozen == tied_to_it
    # Everything else still trains, T5's relative position bias (an Embedding inside block 0) included.
    assert any("relative_attention_bias" in n for n in trainable_names(model))


def test_freeze_decoder_of_tied_llama_leaves_only_the_embedding_and_head(tiny_llama_dir):
    model = load_model(str(tiny_llama_dir), "causal-lm")
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the fixture ties them

    freeze(model, ["decoder"], None)

    assert trainable_names(model) == {"model.embed_tokens.weight", "lm_head.weight"}


# --- a training run with frozen stacks ---

@pytest.fixture(scope="module")
def last_layer_run(tmp_path_factory, tiny_t5_dir):
    output_dir = tmp_path_factory.mktemp("t5-last-layer")
    train.main(["--model", str(tiny_t5_dir), "--qa-style", "generative", "--freeze", "encoder,decoder",
                "--train-last-layers", "1", "--max-steps", "3", "--output-dir", str(output_dir), *SMALL])
    return output_dir


def test_training_moves_only_the_unfrozen_weights(last_layer_run, tiny_t5_dir):
    initial = dict(load_model(str(tiny_t5_dir), "seq2seq").named_parameters(remove_duplicate=False))
    trained = dict(load_model(str(last_layer_run / "latest"), "seq2seq").named_parameters(remove_duplicate=False))
    assert trained.keys() == initial.keys()

    changed_frozen = [n for n in initial if not t5_trains_with_last_layer(n) and not torch.equal(initial[n], trained[n])]
    assert not changed_frozen, f"frozen parameters changed: {changed_frozen[:5]}"
    for group in (*T5_LAST_BLOCKS_AND_NORMS, "shared."):
        members = [n for n in initial if n.startswith(group)]
        assert members, group
        assert any(not torch.equal(initial[n], trained[n]) for n in members), f"nothing in {group}* was trained"


def test_results_count_the_trainable_parameters(last_layer_run, tiny_t5_dir):
    model = load_model(str(tiny_t5_dir), "seq2seq")
    unique = dict(model.named_parameters())  # each tensor once, under its first name
    expected_trainable = sum(p.numel() for n, p in unique.items() if t5_trains_with_last_layer(n))
    results = json.loads((last_layer_run / "results.json").read_text())
    assert results["trainable_parameters"] == expected_trainable
    assert results["total_parameters"] == sum(p.numel() for p in unique.values())
    assert results["steps"] == 3


# --- impossible freezing and LoRA targets: one error line ---

@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory, tiny_llama_dir, tiny_t5_dir):
    return one_step_generative_errors(tmp_path_factory.mktemp("bad-transfer"), {
        "freeze encoder of decoder-only": ["--model", tiny_llama_dir, "--freeze", "encoder"],
        "freeze everything of tied llama": ["--model", tiny_llama_dir, "--freeze", "decoder,embeddings"],
        "more last layers than blocks": ["--model", tiny_t5_dir, "--train-last-layers", "5"],
        "lora targets that match nothing": ["--model", tiny_t5_dir, "--lora", "--lora-targets", "no_such_module"],
    })


@pytest.mark.parametrize("name, mentions", [
    ("freeze encoder of decoder-only", ["--freeze encoder", "decoder-only", "no encoder"]),
    ("freeze everything of tied llama", ["--freeze decoder,embeddings", "no parameter to train"]),
    ("more last layers than blocks", ["--train-last-layers 5", "only 2 blocks"]),
    ("lora targets that match nothing", ["--lora-targets", "no_such_module"]),
])
def test_impossible_transfer_settings_are_one_error_line(bad_runs, name, mentions):
    assert all(text in bad_runs[name] for text in mentions), bad_runs[name]


# --- LoRA ---

def constant_answer_data(directory: Path) -> Path:
    """16 questions whose answer is always "water" (one token of the tiny tokenizer): a LoRA run learns
    it in a few steps, so validation F1 rises above the untrained model's and best/ holds a trained adapter."""
    things = ["bucket", "glass", "bottle", "tank", "jar", "bowl", "cup", "barrel",
              "pool", "vase", "kettle", "pot", "basin", "jug", "can", "tub"]
    articles = []
    for i, thing in enumerate(things):
        context = f"On day {i + 1} the old {thing} near the door was full of water, so nobody could use it."
        qa = {"id": f"q{i}", "question": f"What was the {thing} full of?",
              "answers": [{"text": "water", "answer_start": context.index("water")}]}
        articles.append((f"day {i + 1}", [(context, [qa])]))
    return write_json(directory / "water.json", squad_json(articles))


def lora_parameter_count(model, r: int) -> int:
    """r x (in + out) for every linear layer except the output head: what LoRA adds by default."""
    head = model.get_output_embeddings()
    return sum(r * (m.in_features + m.out_features) for m in model.modules()
               if isinstance(m, torch.nn.Linear) and m is not head)


KINDS = {"llama": "causal-lm", "t5": "seq2seq"}


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, tiny_llama_dir, tiny_t5_dir):
    """A LoRA run with --merge-lora on each tiny model, then predict.py on best/ (adapter) and merged/."""
    data = constant_answer_data(tmp_path_factory.mktemp("water"))
    runs, outputs = {}, {}
    for name, model_dir in (("llama", tiny_llama_dir), ("t5", tiny_t5_dir)):
        output_dir = tmp_path_factory.mktemp(f"lora-{name}")
        train.main(["--model", str(model_dir), "--lora", "--merge-lora", "--learning-rate", "1e-2", "--max-steps", "10",
                    "--eval-steps", "2", "--train-file", str(data), "--validation-file", str(data),
                    "--output-dir", str(output_dir), *SMALL])
        runs[name] = (model_dir, output_dir)
        for checkpoint in ("best", "merged"):
            outputs[(name, checkpoint)] = predict_output(
                "--checkpoint", output_dir / checkpoint, "--input", VALIDATION_SAMPLE,
                "--output", output_dir / f"{checkpoint}-answers.json", "--json", *PREDICT_FLAGS)[0]
    return runs, outputs


@pytest.mark.parametrize("name", KINDS)
def test_lora_checkpoint_is_an_adapter(lora_runs, name):
    model_dir, output_dir = lora_runs[0][name]
    for checkpoint in ("best", "latest"):
        files = {p.name for p in (output_dir / checkpoint).iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "run_config.json"} <= files, checkpoint
        assert "model.safetensors" not in files, checkpoint
        run_config = json.loads((output_dir / checkpoint / "run_config.json").read_text())
        assert run_config["lora"] is True and run_config["base_model"] == str(model_dir)
    results = json.loads((output_dir / "results.json").read_text())
    base = load_model(str(model_dir), KINDS[name])
    assert results["total_parameters"] == sum(p.numel() for p in base.parameters()) + results["trainable_parameters"]
    assert results["trainable_parameters"] == lora_parameter_count(base, r=8)
    assert results["trainable_parameters"] * 5 < results["total_parameters"]


@pytest.mark.parametrize("name", KINDS)
def test_merged_model_is_a_plain_model_with_the_adapter_in_it(lora_runs, name):
    model_dir, output_dir = lora_runs[0][name]
    merged_dir = output_dir / "merged"
    files = {p.name for p in merged_dir.iterdir()}
    assert "model.safetensors" in files and "config.json" in files
    assert not {"adapter_config.json", "adapter_model.safetensors"} & files
    assert "quantization_config" not in json.loads((merged_dir / "config.json").read_text())
    assert json.loads((merged_dir / "run_config.json").read_text())["lora"] is False

    base = load_model(str(model_dir), KINDS[name])
    merged = dict(load_model(str(merged_dir), KINDS[name]).named_parameters())
    assert merged.keys() == dict(base.named_parameters()).keys()  # no lora_A / lora_B left
    adapted = {n + ".weight" for n, m in base.named_modules()
               if isinstance(m, torch.nn.Linear) and m is not base.get_output_embeddings()}
    for parameter_name, weight in base.named_parameters():
        if parameter_name not in adapted:
            assert torch.equal(merged[parameter_name], weight), f"{parameter_name} is not adapted but changed"
    # best/ holds a trained adapter (B starts at zero), so merging changed the adapted weights.
    assert any(not torch.equal(merged[n], w) for n, w in base.named_parameters() if n in adapted)


@pytest.mark.parametrize("name", KINDS)
def test_adapter_and_merged_model_answer_alike(lora_runs, name):
    output_dir = lora_runs[0][name][1]
    printed = {checkpoint: lora_runs[1][(name, checkpoint)] for checkpoint in ("best", "merged")}
    answers = {c: json.loads((output_dir / f"{c}-answers.json").read_text()) for c in printed}
    assert answers["best"] == answers["merged"]
    assert any(answers["best"].values()), "every answer is empty: the comparison would prove little"
    records = {c: json.loads(out) for c, out in printed.items()}
    assert records["best"].keys() == records["merged"].keys() == answers["best"].keys()
    for qid, record in records["best"].items():
        # Merging only reorders float arithmetic: the mean log-probabilities agree closely.
        assert record["score"] == pytest.approx(records["merged"][qid]["score"], abs=2e-3), qid


def test_the_python_api_answers_as_the_command_line_and_transformers_pipeline_loads_the_merged_model(lora_runs):
    """The decoder-only QA adapter through predict.load: the answers predict.py printed for the
    sample's questions; the adapter and its merged model generate alike in transformers' own
    text-generation pipeline."""
    import predict
    from conftest import pipeline_generation
    from data.squad import SquadExamples

    output_dir = lora_runs[0]["llama"][1]
    examples = SquadExamples.load(str(VALIDATION_SAMPLE)).examples[:6]
    model = predict.load(str(output_dir / "best"), device="cpu", precision="fp32")
    printed = json.loads(lora_runs[1][("llama", "best")])
    assert model.answer(question=[e.question for e in examples], context=[e.context for e in examples]) == \
        [printed[e.id] for e in examples]
    # transformers loads the adapter itself too (peft's integration, the base model from adapter_config.json)
    generated = pipeline_generation(output_dir / "merged")
    assert generated.startswith("The river") and len(generated) > len("The river")
    assert pipeline_generation(output_dir / "best") == generated


# --- layer-wise learning-rate decay, the fresh span head's scale, hidden dropout ---

def test_layer_decay_gives_each_block_the_rate_of_the_one_above_times_the_decay(tiny_model_dir, tmp_path):
    """On the 2-block BERT with --layer-decay 0.5: the head and the last block at the run's rate,
    block 0 at half, the embeddings at a quarter, through the schedule's steps."""
    from conftest import tiny_args

    run = train.setup(train.parse_settings(tiny_args(tiny_model_dir, tmp_path, "--layer-decay", "0.5")),
                      torch.device("cpu"))
    expected = {"bert.embeddings.": 0.25, "bert.encoder.layer.0.": 0.5, "bert.encoder.layer.1.": 1.0, "qa_outputs.": 1.0}
    for _ in range(3):
        rate = {id(p): group["lr"] for group in run.optimizer.param_groups for p in group["params"]}
        rates = {name: rate[id(p)] for name, p in run.model.named_parameters()}
        assert len(rates) == len(list(run.model.parameters()))  # every parameter trains, at one rate
        for name, value in rates.items():
            share = next(share for prefix, share in expected.items() if name.startswith(prefix))
            assert value == pytest.approx(share * rates["qa_outputs.weight"]), name
        run.optimizer.step()
        run.scheduler.step()


def test_a_fresh_span_head_starts_at_its_scale_and_a_trained_one_as_saved(minilm_path, tiny_model_dir):
    from models.build import ModelSettings, load_for_training

    def head(model_dir: str, scale: float) -> torch.Tensor:
        torch.manual_seed(0)  # as train.py's setup: the fresh head's draw is the seed's
        model = load_for_training(ModelSettings(span_head_init_scale=scale), model_dir, "span", None, {})
        return model.qa_outputs.weight.detach()

    fresh = {scale: head(minilm_path, scale) for scale in (1.0, 0.5, 0.0)}
    assert fresh[1.0].std() > 0 and torch.equal(fresh[0.5], fresh[1.0] * 0.5) and not fresh[0.0].any()
    assert torch.equal(head(str(tiny_model_dir), 0.0), load_model(str(tiny_model_dir), "span").qa_outputs.weight)


@pytest.mark.parametrize("hidden_dropout", [None, 0.0, 0.3])
def test_hidden_dropout_replaces_the_models_own(tiny_model_dir, hidden_dropout):
    """The tiny BERT has 0.1 on its hidden states and its attention probabilities; --hidden-dropout
    changes the former only (--attention-dropout the latter)."""
    model = load_model(str(tiny_model_dir), "span", attention_dropout=0.2, hidden_dropout=hidden_dropout)
    rates = {name: m.p for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}
    expected = 0.1 if hidden_dropout is None else hidden_dropout
    assert rates and all(p == (0.2 if name.endswith("self.dropout") else expected) for name, p in rates.items()), rates
