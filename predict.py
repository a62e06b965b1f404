"""Answer questions, generate text, or score text, with a fine-tuned checkpoint.

    python predict.py --context "..." --question "..."
    python predict.py --context-file article.txt --question "..." --json
    python predict.py --input questions.jsonl --output predictions.json
    python predict.py --prompt "Once upon a time" --max-new-tokens 80 --seed 1
    python predict.py --checkpoint outputs/clm --input held_out.txt    # perplexity, as train.py evaluates
    python predict.py --checkpoint smollm2-135m --input held_out.txt   # a base model's (zero-shot)
    torchrun --nproc_per_node 2 predict.py --checkpoint outputs/clm --input corpus/   # each process a share
    python predict.py --checkpoint outputs/qa        # interactive: questions from standard input

Interactive (no --question, --input, --dataset or --prompt): the model loads once, then standard
input is read line by line. For a QA checkpoint the first line is the context (or give --context/
--context-file), each later line a question about it, and a line `context: NEW TEXT` changes the
context. For a causal LM checkpoint each line is a prompt. An answer (or continuation) is printed
per line; a bad line gets an error line and the session goes on; end of input (Ctrl-D) ends it.

--input (or --dataset, its validation split) with a causal LM checkpoint or a base decoder-only
model gives the perplexity of the text, read, cut into blocks and scored by the code of train.py's
evaluation with the checkpoint's --line-by-line, --text-field and --block-size: on the same text,
the number train.py reported. Under torchrun (--input or --dataset only, QA or text) each process
takes a share of the batches and rank 0 prints.

Works with every checkpoint train.py writes (extractive, seq2seq, decoder-only, LoRA adapter,
merged LoRA, causal LM), and uses the same windowing, forward pass and answer selection as evaluation.
"""
import json
import logging
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from clm.generation import SamplingSettings, check_max_new_tokens, generate_text, prompt_ids
from clm.language_model import perplexity
from clm.task import (CLMTask, TextSettings, block_size_for, decoder_only_config, evaluation_blocks, file_source,
                      pad_token_id, split_source, text_tokenizer)
from data import DatasetSettings
from data.hf_datasets import load_splits
from data.squad import SquadExample, SquadExamples
from data.text_blocks import TokenCacheSettings, base_suffix
from data.text_files import read_text
from engine.checkpoint import BEST, find_checkpoint, load_run_config, verified_checkpoint
from engine.device import DeviceSettings, configure_device, out_of_memory_as_error, pick_precision
from engine.distributed import close_processes, init_processes, launched_by_torchrun
from engine.errors import UserError, run_cli
from engine.files import atomic_write_text
from engine.settings import flag, parse, setting, trained
from models.backbones import PACKAGED_MODELS, load_config, load_tokenizer, resolve_model
from models.build import load_trained_model, place, trained_model_source
from qa.metrics import squad_scores
from qa.styles import make_qa
from qa.task import AnswerSettings, QATask, check_qa_lengths



@dataclass(frozen=True)
class PredictSettings(AnswerSettings, TextSettings, TokenCacheSettings, DatasetSettings, SamplingSettings,
                      DeviceSettings):
    """what to answer, and where"""

    checkpoint: str | None = setting(None, "checkpoint directory written by train.py, or a run's output directory to "
                                           "use its best/ (default: outputs/qa, with --prompt outputs/clm); with "
                                           "--input or --dataset also a base decoder-only model (a model directory, "
                                           "or an alias such as smollm2-135m): its zero-shot perplexity")
    question: str | None = setting(None, "the question to answer")
    context: str | None = setting(None, "the text that contains the answer")
    context_file: str | None = setting(None, "read the context from this UTF-8 text file")
    input: str | None = setting(None, "many questions at once: SQuAD JSON or JSON Lines, as for training (answers "
                                      "optional); for a causal LM, text to score as train.py's validation file: .txt "
                                      "or .jsonl (optionally .gz), or a directory of them")
    output: str | None = setting(None, "with --input or --dataset: write the {id: answer} predictions (a causal LM: "
                                       "its scores) here as JSON (default: print them)")
    json: bool = setting(False, "print answer, score and character offsets (a causal LM: its scores) as JSON")
    batch_size: int | None = setting(None, "windows or blocks per forward pass; default as train.py evaluates: "
                                           f"{QATask.DEFAULTS['eval_batch_size']} windows (qa), "
                                           f"{CLMTask.DEFAULTS['eval_batch_size']} blocks (causal LM)", at_least=1)
    prompt: str | None = setting(None, "causal LM: generate a continuation of this text, streamed as it is produced")
    prompt_file: str | None = setting(None, "causal LM: read the prompt from this UTF-8 text file")
    chat: bool = setting(False, "causal LM: put the prompt in the model's chat template as the user turn")

    def __post_init__(self):
        # An empty --question or --context is given, not missing: it gets the reader's "empty question" line.
        given = {name for name in ("question", "context", "context_file", "input", "dataset", "prompt", "prompt_file")
                 if getattr(self, name) is not None}
        for pair in (("context", "context_file"), ("prompt", "prompt_file"), ("input", "dataset")):
            if set(pair) <= given:
                raise UserError(f"give --{pair[0]} or --{pair[1].replace('_', '-')}, not both")
        if given & {"prompt", "prompt_file"} and given - {"prompt", "prompt_file"}:
            raise UserError("--prompt generates text; it does not combine with the question-answering flags")
        many = given & {"input", "dataset"}
        if many and given & {"question", "context", "context_file"}:
            raise UserError(f"--{many.pop()} replaces --question/--context/--context-file")
        if "question" in given and not given & {"context", "context_file"}:
            raise UserError("give --question with --context or --context-file, or --input FILE, or no question to ask "
                            "them interactively")

    @property
    def generating(self) -> bool:
        return self.prompt is not None or self.prompt_file is not None

    @property
    def many(self) -> str | None:
        """What --input or --dataset names: many questions, or text to score."""
        return self.input or self.dataset


def parse_settings(argv=None) -> PredictSettings:
    argv = sys.argv[1:] if argv is None else list(argv)
    argv = ["--no-do-sample" if a == "--greedy" else a for a in argv]  # --greedy: the shorter name
    settings = parse(PredictSettings, argv, __doc__, as_trained=(AnswerSettings, TextSettings))
    default = "outputs/clm" if settings.generating else "outputs/qa"
    return replace(settings, checkpoint=settings.checkpoint or default)


def is_interactive(settings: PredictSettings) -> bool:
    return settings.question is None and settings.many is None and not settings.generating


def given_context(settings: PredictSettings) -> str | None:
    return read_text(settings.context_file) if settings.context_file else settings.context


def one_question(qid: str, context: str, question: str, where: str) -> list[SquadExample]:
    """A question checked as the file readers check theirs (empty text, length)."""
    record = {"id": qid, "context": context, "question": question}
    return SquadExamples.from_records([(where, record)], where, require_answers=False).examples


def read_examples(settings: PredictSettings) -> list[SquadExample]:
    if settings.input and (Path(settings.input).is_dir() or base_suffix(Path(settings.input)) == ".txt"):
        raise UserError(f"{settings.input}: {settings.checkpoint} answers questions (SQuAD JSON or JSON Lines); the "
                        "perplexity of text needs a causal LM checkpoint (train.py --task clm) or a base model")
    if settings.many:
        return SquadExamples.load(settings.many, "validation", require_answers=False).examples
    return one_question("question", given_context(settings), settings.question,
                        settings.context_file or "command line")


def locate(name: str) -> Path:
    """The checkpoint --checkpoint names; a model alias or .gguf file names that base model."""
    if name in PACKAGED_MODELS or name.endswith(".gguf"):
        return Path(resolve_model(name))
    return find_checkpoint(Path(name), BEST)


def scores_text(settings: PredictSettings, run_config: dict) -> bool:
    """Whether --input or --dataset is text to score: given to a causal LM checkpoint, or to a base
    model (no run_config.json)."""
    return settings.many is not None and run_config.get("task", "clm") == "clm"


def load_checkpoint(settings: PredictSettings, checkpoint: Path, run_config: dict, generating: bool | None):
    """The tokenizer and model of the checkpoint, checked against its manifest as they load, whether
    it generates, and --input's or the command line's questions (None when it generates). The flags
    are checked against the checkpoint's model configuration, and the questions read, before the
    weights load. `generating` None (interactive): whatever the checkpoint does, text generation for
    --task clm."""
    read_questions = generating is False
    with verified_checkpoint(checkpoint):
        if generating is None:
            generating = run_config.get("task") == "clm"
        if generating and run_config.get("model_kind") != "causal-lm":
            raise UserError(f"{checkpoint}: --prompt needs a causal LM checkpoint (train.py --task clm, or generative "
                            "QA with a decoder-only model)")
        if not generating and run_config.get("task") != "qa":
            why = (f"trained with --task {run_config['task']}; generate from it with --prompt, or score text with "
                   "--input" if run_config else "no run_config.json")
            raise UserError(f"{checkpoint}: not a question-answering checkpoint written by train.py ({why})")
        check_against_model(settings, run_config, generating, checkpoint)
        examples = read_examples(settings) if read_questions else None
        tokenizer = load_tokenizer(str(checkpoint))
        if settings.chat and not tokenizer.chat_template:
            raise UserError(f"{checkpoint}: --chat needs a tokenizer with a chat template, and this one has none")
        model = load_trained_model(checkpoint, run_config)
    return tokenizer, model, generating, examples


def check_against_model(settings: PredictSettings, run_config: dict, generating: bool, checkpoint: Path) -> None:
    """The flags given for answering or generating, against the checkpoint's way of answering and its
    model's configuration (cheap: no weights)."""
    config = load_config(trained_model_source(checkpoint, run_config))
    if generating:
        check_max_new_tokens(config, settings.checkpoint, settings.max_new_tokens)
        return
    if run_config.get("qa_style") == "extractive":
        given = [flag(name) for name in ("max_answer_tokens", "num_beams") if getattr(settings, name) is not None]
        if given:
            raise UserError(f"{settings.checkpoint}: {' and '.join(given)} {'is' if len(given) == 1 else 'are'} for "
                            "checkpoints that generate their answers; this one points at spans of the context")
        return
    if settings.null_score_diff_threshold is not None:
        raise UserError(f"{settings.checkpoint}: --null-score-diff-threshold is for extractive checkpoints; this "
                        "one generates its answers (an empty one is its 'no answer')")
    if settings.max_answer_tokens is not None:
        check_qa_lengths(config, settings.checkpoint, run_config["model_kind"], run_config["max_seq_length"], run_config["doc_stride"],
                         settings.max_answer_tokens)


def text_perplexity(settings: PredictSettings, checkpoint: Path, run_config: dict, device) -> None:
    """The perplexity of --input's text (or --dataset's validation split) under a causal LM
    checkpoint or a base model, through the code of train.py's evaluation: the checkpoint's text
    flags and block size (a base model's defaults, as training's), the same blocks and the same
    sum. Under torchrun each process scores a share, and rank 0 prints."""
    if settings.input and base_suffix(Path(settings.input)) == ".json":
        raise UserError(f"{settings.input}: SQuAD questions need a question-answering checkpoint; {checkpoint} is a "
                        f"{'causal LM checkpoint' if run_config else 'base model'}, which scores the perplexity of "
                        "text (.txt or .jsonl files, or a directory of them)")
    text = trained(TextSettings, settings, run_config)
    source = (split_source(load_splits(settings.dataset, settings.dataset_config), "validation", settings.dataset, text)
              if settings.dataset else file_source(settings.input, text))
    with verified_checkpoint(checkpoint):
        # A base model is checked as training checks one; a checkpoint was, when it trained.
        config = (load_config(trained_model_source(checkpoint, run_config)) if run_config else
                  decoder_only_config(str(checkpoint), settings.checkpoint))
        block_size = block_size_for(config, text.block_size, settings.checkpoint)
        tokenizer = load_tokenizer(str(checkpoint)) if run_config else text_tokenizer(str(checkpoint), settings.checkpoint)
        model = load_trained_model(checkpoint, run_config or {"model_kind": "causal-lm"})
    blocks = evaluation_blocks(source, tokenizer, block_size, settings.cache_dir)
    precision, _ = pick_precision(settings.precision, device)
    model, _ = place(model, device, precision)
    batch_size = settings.batch_size or CLMTask.DEFAULTS["eval_batch_size"]
    with out_of_memory_as_error(device, f"scoring batches of {batch_size} blocks", "lower --batch-size"):
        scores = perplexity(model, blocks, pad_token_id(tokenizer), device, precision, batch_size)
    if scores is None:  # not rank 0: it has them
        return
    if settings.json:
        print(json.dumps(scores, indent=2))
    else:
        print(f"{source.where}: {CLMTask.describe(scores)} (blocks of {blocks.block_size})", flush=True)
    if settings.output:
        write_json(settings.output, scores, "the scores")


def answering(run_config: dict, settings: PredictSettings) -> dict:
    """The checkpoint's answer settings, with those given on the command line in their place."""
    overrides = {"max_answer_tokens": settings.max_answer_tokens, "num_beams": settings.num_beams}
    run_config = {**run_config, **{name: value for name, value in overrides.items() if value is not None}}
    if settings.null_score_diff_threshold is not None:
        run_config.update(allow_null=True, null_threshold=settings.null_score_diff_threshold)
    return run_config


def generate(settings: PredictSettings, text: str, tokenizer, model, device, precision: str) -> None:
    """Continue `text` with a causal LM checkpoint (any train.py checkpoint of one)."""
    stream = settings.num_return_sequences == 1
    ids = prompt_ids(tokenizer, text, settings.chat)
    check_max_new_tokens(model.config, settings.checkpoint, settings.max_new_tokens, len(ids))
    texts = generate_text(model, tokenizer, ids, settings, device, precision, stream)
    if not stream:  # a streamed text ends with its own newline
        for number, generated in enumerate(texts, start=1):
            print(f"--- {number}\n{generated}")


def answer(settings: PredictSettings, qa, model, examples: list[SquadExample], where: str, device,
           precision: str) -> dict:
    """{question id: prediction}: the same windows, forward pass and answer selection as evaluation."""
    features = qa.features(examples, where)
    with out_of_memory_as_error(device, f"answering batches of {settings.batch_size} windows", "lower --batch-size"):
        return qa.answer_questions(model, features, device, precision, settings.batch_size)


def print_answer(settings: PredictSettings, prediction) -> None:
    if settings.json:
        print(json.dumps(prediction.as_record(), indent=2, ensure_ascii=False), flush=True)
    else:
        print(prediction.text or "(no answer)", flush=True)


def interactive(settings: PredictSettings, qa, tokenizer, model, device, precision: str) -> None:
    """Lines from standard input, the model loaded once (see the module's docstring); `qa` None for a
    causal LM. A mistake in one line is reported and the session goes on."""
    terminal = sys.stdin.isatty()
    context = given_context(settings) if qa else None
    asked = 0

    def ask() -> None:
        if terminal:
            print("prompt> " if qa is None else "context> " if context is None else "question> ",
                  end="", file=sys.stderr, flush=True)

    ask()
    for number, line in enumerate(sys.stdin, start=1):
        line = line.strip()
        try:
            if not line:
                pass
            elif qa is None:
                generate(settings, line, tokenizer, model, device, precision)
            elif line.lower().startswith("context:"):
                context = line[len("context:"):].strip()
            elif context is None:
                context = line
            else:
                asked += 1
                qid, where = f"question-{asked}", f"standard input, line {number}"
                examples = one_question(qid, context, line, where)
                print_answer(settings, answer(settings, qa, model, examples, where, device, precision)[qid])
        except UserError as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
        ask()


def write_json(path: str, value, what: str) -> None:
    try:
        atomic_write_text(Path(path), json.dumps(value, indent=1, ensure_ascii=False))
    except OSError as error:
        raise UserError(f"{path}: cannot write {what} ({error.strerror or error})") from None


def write_answers(settings: PredictSettings, predictions: dict, examples: list[SquadExample]) -> None:
    """The answers to --input's questions: to --output, or printed; scored on those with gold answers."""
    if settings.json:
        print(json.dumps({qid: p.as_record() for qid, p in predictions.items()}, indent=2, ensure_ascii=False))
    answers = {qid: p.text for qid, p in predictions.items()}
    if settings.output:
        write_json(settings.output, answers, "the predictions")
        print(f"wrote {len(answers)} answers to {settings.output}", file=sys.stderr)
    elif not settings.json:
        print(json.dumps(answers, indent=1, ensure_ascii=False))
    answered = [e for e in examples if e.has_gold]
    if answered:
        print(f"scored on the questions with gold answers: {QATask.describe(squad_scores(answers, answered))}",
              file=sys.stderr)


def predict(settings: PredictSettings, checkpoint: Path, run_config: dict, device) -> None:
    """Answers, or generated text."""
    generating = None if is_interactive(settings) else settings.generating
    tokenizer, model, generating, examples = load_checkpoint(settings, checkpoint, run_config, generating)
    precision, _ = pick_precision(settings.precision, device)
    model, _ = place(model, device, precision)
    if generating and (settings.context is not None or settings.context_file):
        raise UserError(f"{settings.checkpoint}: a causal LM checkpoint answers no questions: --context is for "
                        "question answering; give prompts on standard input")
    if generating and not is_interactive(settings):
        prompt = read_text(settings.prompt_file) if settings.prompt_file else settings.prompt
        generate(settings, prompt, tokenizer, model, device, precision)
        return
    settings = replace(settings, batch_size=settings.batch_size or QATask.DEFAULTS["eval_batch_size"])
    qa = None if generating else make_qa(answering(run_config, settings), tokenizer)
    if is_interactive(settings):
        interactive(settings, qa, tokenizer, model, device, precision)
        return
    predictions = answer(settings, qa, model, examples, settings.many or "command line", device, precision)
    if predictions is None:  # not rank 0: it has them
        return
    if settings.many:
        write_answers(settings, predictions, examples)
    else:
        print_answer(settings, predictions["question"])


def main(argv=None) -> None:
    settings = parse_settings(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if launched_by_torchrun() and settings.many is None:
        raise UserError("under torchrun, predict.py shares the questions of --input or --dataset, or the text to score, "
                        "among the processes; run other predictions as one process")
    if settings.output and not Path(settings.output).absolute().parent.is_dir():
        raise UserError(f"--output {settings.output}: the directory {Path(settings.output).absolute().parent} does "
                        "not exist")
    checkpoint = locate(settings.checkpoint)
    run_config = load_run_config(checkpoint)  # what the checkpoint does, before the slow loading
    device = init_processes(settings.device)  # under torchrun; plain `python predict.py` has no process group
    configure_device(device)
    if scores_text(settings, run_config):
        text_perplexity(settings, checkpoint, run_config, device)
    else:
        predict(settings, checkpoint, run_config, device)
    close_processes()


if __name__ == "__main__":
    run_cli(main)
