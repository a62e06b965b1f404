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

From Python, `load(CHECKPOINT)` gives a `Predictor` with `answer`, `generate` and `perplexity`: the
methods this command line runs on (see `Predictor`).
"""
import json
import logging
import sys
import tempfile
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


def check_task(name: str, run_config: dict, use: str) -> None:
    """Whether the checkpoint does `use`: "answer" needs a question-answering checkpoint; "generate"
    and "score" a causal LM (a checkpoint of one, or a base model, which must be decoder-only)."""
    if use != "answer" and run_config.get("model_kind", "causal-lm") != "causal-lm":
        raise UserError(f"{name}: {'generating' if use == 'generate' else 'scoring text'} needs a causal LM checkpoint "
                        "(train.py --task clm, or generative QA with a decoder-only model) or a base decoder-only model")
    if use == "answer" and run_config.get("task") != "qa":
        why = (f"trained with --task {run_config['task']}; generate from it with --prompt, or score text with "
               "--input" if run_config else "a base model, with no run_config.json")
        raise UserError(f"{name}: not a question-answering checkpoint written by train.py ({why})")


def check_against_model(settings: PredictSettings, run_config: dict, use: str, checkpoint: Path):
    """The flags given for `use` (answer, generate, score), against the checkpoint's way of answering
    and its model's configuration (cheap: no weights); returns that configuration."""
    check_task(settings.checkpoint, run_config, use)
    config = (load_config(trained_model_source(checkpoint, run_config)) if run_config else
              decoder_only_config(str(checkpoint), settings.checkpoint))
    if use == "generate":
        check_max_new_tokens(config, settings.checkpoint, settings.max_new_tokens)
    elif use == "score":
        block_size_for(config, trained(TextSettings, settings, run_config).block_size, settings.checkpoint)
    elif run_config.get("qa_style") == "extractive":
        given = [flag(name) for name in ("max_answer_tokens", "num_beams") if getattr(settings, name) is not None]
        if given:
            raise UserError(f"{settings.checkpoint}: {' and '.join(given)} {'is' if len(given) == 1 else 'are'} for "
                            "checkpoints that generate their answers; this one points at spans of the context")
    elif settings.null_score_diff_threshold is not None:
        raise UserError(f"{settings.checkpoint}: --null-score-diff-threshold is for extractive checkpoints; this "
                        "one generates its answers (an empty one is its 'no answer')")
    elif settings.max_answer_tokens is not None:
        check_qa_lengths(config, settings.checkpoint, run_config["model_kind"], run_config["max_seq_length"],
                         run_config["doc_stride"], settings.max_answer_tokens)
    return config


def load_checkpoint(checkpoint: Path, run_config: dict, name: str):
    """The tokenizer, configuration and model (on the host) of a checkpoint train.py wrote, checked
    against its manifest as they load; or of a base model (no run_config.json), which must be
    decoder-only and have an end-of-sequence token: it scores text and generates."""
    with verified_checkpoint(checkpoint):
        if run_config:
            config = load_config(trained_model_source(checkpoint, run_config))
            tokenizer = load_tokenizer(str(checkpoint))
        else:
            config = decoder_only_config(str(checkpoint), name)
            tokenizer = text_tokenizer(str(checkpoint), name)
        model = load_trained_model(checkpoint, run_config or {"model_kind": "causal-lm"})
    return tokenizer, config, model


def answering(run_config: dict, settings: PredictSettings) -> dict:
    """The checkpoint's answer settings, with those given on the command line in their place."""
    overrides = {"max_answer_tokens": settings.max_answer_tokens, "num_beams": settings.num_beams}
    run_config = {**run_config, **{name: value for name, value in overrides.items() if value is not None}}
    if settings.null_score_diff_threshold is not None:
        run_config.update(allow_null=True, null_threshold=settings.null_score_diff_threshold)
    return run_config


def answer_record(prediction, context: str) -> dict:
    """answer, score, start and end of a prediction, as predict.py --json prints them: for a generated
    answer, start and end are where it appears in the context (None where it does not)."""
    record = prediction.as_record()
    if "start" not in record:
        start = context.find(record["answer"]) if record["answer"] else -1
        found = start >= 0
        record.update(start=start if found else None, end=start + len(record["answer"]) if found else None)
    return record


def ranked_records(prediction, top_k: int) -> list[dict]:
    """The `top_k` best answers of an extractive prediction, best first ("no answer" first when it won)."""
    spans = [{"answer": text, "score": round(probability, 4), "start": start, "end": end}
             for text, start, end, probability in prediction.ranked]
    no_answer = [prediction.as_record()] if prediction.no_answer else []
    return no_answer + spans[:top_k - len(no_answer)]


def with_options(settings: PredictSettings, **options) -> PredictSettings:
    """`settings` with keyword arguments in place of the flags they name (max_new_tokens for
    --max-new-tokens), parsed and checked as those flags are."""
    argv = []
    for name, value in options.items():
        if isinstance(value, bool):
            argv.append(flag(name) if value else "--no-" + flag(name)[2:])
        elif value is not None:
            argv += [flag(name), str(value)]
    given = parse(PredictSettings, argv, __doc__, as_trained=(AnswerSettings, TextSettings))
    return replace(settings, **{name: getattr(given, name) for name, value in options.items() if value is not None})


class Predictor:
    """A checkpoint train.py wrote (extractive, seq2seq, decoder-only, LoRA adapter, merged, causal
    LM), or a base model by alias or path, loaded once onto the device the machine offers, in the
    precision it offers; predict.py's command line runs on these methods. From Python:

        from predict import load

        qa = load("outputs/qa")
        qa.answer(question="Where does the Amazon empty?", context="The Amazon ... the Atlantic.")
        # {'answer': ..., 'score': ..., 'start': ..., 'end': ...}: character offsets in the context
        qa.answer(question=["Q1", "Q2"], context=["C1", "C2"], top_k=3)  # a list per question
        lm = load("outputs/clm")  # or load("smollm2-135m"), a base model
        lm.generate("Once upon a time", max_new_tokens=40, seed=1)
        lm.perplexity("Some held-out text.")  # or path="held_out.txt": {loss, perplexity, tokens}

    Keyword arguments are predict.py's flags (max_new_tokens for --max-new-tokens, batch_size,
    num_beams, null_score_diff_threshold, ...), checked as the command line checks them; a mistake
    raises UserError with the line predict.py would print."""

    def __init__(self, settings: PredictSettings, checkpoint: Path, run_config: dict):
        self.settings, self.checkpoint, self.run_config = settings, checkpoint, run_config
        self.device = init_processes(settings.device)  # under torchrun; otherwise no process group
        configure_device(self.device)
        self.precision, _ = pick_precision(settings.precision, self.device)
        self.tokenizer, self.config, model = load_checkpoint(checkpoint, run_config, settings.checkpoint)
        self.model, _ = place(model, self.device, self.precision)

    def answer(self, question: str | list[str], context: str | list[str], top_k: int = 1, **options):
        """The answer to `question` about `context` (lists of both, or one context for every question:
        a list of answers): a dict of answer, score, start and end (character offsets in the context),
        as transformers' question-answering pipeline gave; "no answer" is answer "" (SQuAD v2
        checkpoints). Long contexts are read in windows, as evaluation reads them. With `top_k` > 1
        (extractive checkpoints): a list of the best answers, best first."""
        settings = with_options(self.settings, **options)
        check_against_model(settings, self.run_config, "answer", self.checkpoint)
        if top_k < 1:
            raise UserError(f"top_k={top_k}: give 1 or more")
        if top_k > 1 and self.run_config["qa_style"] != "extractive":
            raise UserError(f"top_k={top_k}: {settings.checkpoint} generates one answer per question (extractive "
                            "checkpoints rank spans)")
        single = isinstance(question, str)
        questions = [question] if single else list(question)
        contexts = [context] * len(questions) if isinstance(context, str) else list(context)
        if len(contexts) != len(questions):
            raise UserError(f"{len(questions)} questions and {len(contexts)} contexts: give one context, or one per "
                            "question")
        examples = [example for number, (q, c) in enumerate(zip(questions, contexts), start=1)
                    for example in one_question(f"question-{number}", c, q, f"question {number}")]
        predictions = self.answers(settings, examples, "answer()", top_k)
        if predictions is None:  # not rank 0: it has them
            return None
        records = [ranked_records(predictions[e.id], top_k) if top_k > 1 else answer_record(predictions[e.id], e.context)
                   for e in examples]
        return records[0] if single else records

    def answers(self, settings: PredictSettings, examples: list[SquadExample], where: str, top_k: int = 1) -> dict | None:
        """{question id: prediction}: the same windows, forward pass and answer selection as evaluation
        (under torchrun each process answers a share, and rank 0 gets them all)."""
        qa = make_qa(answering(self.run_config, settings), self.tokenizer)
        features = qa.features(examples, where)
        batch_size = settings.batch_size or QATask.DEFAULTS["eval_batch_size"]
        with out_of_memory_as_error(self.device, f"answering batches of {batch_size} windows", "lower --batch-size"):
            return qa.answer_questions(self.model, features, self.device, self.precision, batch_size,
                                       **({"top_k": top_k} if top_k > 1 else {}))

    def generate(self, prompt: str, stream: bool = False, **options) -> str | list[str]:
        """A continuation of `prompt` (with num_return_sequences > 1, a list of them), sampled with the
        settings of predict.py --prompt (max_new_tokens, do_sample, temperature, top_k, top_p, seed;
        chat=True puts the prompt in the model's chat template); `stream` prints it as it comes."""
        return self.generated(with_options(self.settings, **options), prompt, stream)

    def generated(self, settings: PredictSettings, prompt: str, stream: bool) -> str | list[str]:
        check_task(settings.checkpoint, self.run_config, "generate")
        if settings.chat and not self.tokenizer.chat_template:
            raise UserError(f"{settings.checkpoint}: --chat needs a tokenizer with a chat template, and this one has none")
        ids = prompt_ids(self.tokenizer, prompt, settings.chat)
        check_max_new_tokens(self.config, settings.checkpoint, settings.max_new_tokens, len(ids))
        single = settings.num_return_sequences == 1
        texts = generate_text(self.model, self.tokenizer, ids, settings, self.device, self.precision, stream and single)
        return texts[0] if single else texts

    def perplexity(self, text: str | None = None, path: str | None = None, **options) -> dict | None:
        """{loss, perplexity, tokens} of `text`, or of the .txt/.jsonl file (or directory of them) at
        `path`, as train.py's evaluation scores its validation text: the checkpoint's --line-by-line,
        --text-field and --block-size, the same blocks and sum (under torchrun, None but on rank 0)."""
        if (text is None) == (path is None):
            raise UserError("perplexity(): give the text, or path= a file of it (not both)")
        settings = with_options(self.settings, **options)
        check_against_model(settings, self.run_config, "score", self.checkpoint)
        if path is not None:
            return self.scores(settings, file_source(path, trained(TextSettings, settings, self.run_config)))[0]
        with tempfile.TemporaryDirectory() as directory:  # read as a .txt file is; its tokens cached for this call only
            file = Path(directory) / "text.txt"
            file.write_text(text, encoding="utf-8")
            source = file_source(str(file), trained(TextSettings, settings, self.run_config))
            return self.scores(replace(settings, cache_dir=directory), source._replace(where="text"))[0]

    def scores(self, settings: PredictSettings, source) -> tuple[dict | None, int]:
        """The scores of a text source, and the block size they were measured over."""
        block_size = block_size_for(self.config, trained(TextSettings, settings, self.run_config).block_size,
                                    settings.checkpoint)
        blocks = evaluation_blocks(source, self.tokenizer, block_size, settings.cache_dir)
        batch_size = settings.batch_size or CLMTask.DEFAULTS["eval_batch_size"]
        with out_of_memory_as_error(self.device, f"scoring batches of {batch_size} blocks", "lower --batch-size"):
            return perplexity(self.model, blocks, pad_token_id(self.tokenizer), self.device, self.precision,
                              batch_size), blocks.block_size


def load(checkpoint: str, **options) -> Predictor:
    """`checkpoint` (a checkpoint directory, a run's output directory for its best/, a model alias
    or directory) loaded once; `options` are predict.py's flags (device="cpu", precision="fp32", ...)
    kept for every call. See `Predictor`."""
    settings = with_options(parse_settings([]), checkpoint=checkpoint, **options)
    located = locate(settings.checkpoint)
    return Predictor(settings, located, load_run_config(located))


# --- The command line --------------------------------------------------------------------------------

def print_answer(settings: PredictSettings, prediction, context: str) -> None:
    if settings.json:
        print(json.dumps(answer_record(prediction, context), indent=2, ensure_ascii=False), flush=True)
    else:
        print(prediction.text or "(no answer)", flush=True)


def interactive(settings: PredictSettings, predictor: Predictor, answering_questions: bool) -> None:
    """Lines from standard input, the model loaded once (see the module's docstring). A mistake in
    one line is reported and the session goes on."""
    terminal = sys.stdin.isatty()
    context = given_context(settings) if answering_questions else None
    asked = 0

    def ask() -> None:
        if terminal:
            print("prompt> " if not answering_questions else "context> " if context is None else "question> ",
                  end="", file=sys.stderr, flush=True)

    ask()
    for number, line in enumerate(sys.stdin, start=1):
        line = line.strip()
        try:
            if not line:
                pass
            elif not answering_questions:
                print_generated(settings, predictor, line)
            elif line.lower().startswith("context:"):
                context = line[len("context:"):].strip()
            elif context is None:
                context = line
            else:
                asked += 1
                qid, where = f"question-{asked}", f"standard input, line {number}"
                examples = one_question(qid, context, line, where)
                print_answer(settings, predictor.answers(settings, examples, where)[qid], context)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
        ask()


def print_generated(settings: PredictSettings, predictor: Predictor, prompt: str) -> None:
    """One continuation streamed as it comes, or several printed at the end."""
    texts = predictor.generated(settings, prompt, stream=True)
    if settings.num_return_sequences > 1:
        for number, generated in enumerate(texts, start=1):
            print(f"--- {number}\n{generated}")


def write_json(path: str, value, what: str) -> None:
    try:
        atomic_write_text(Path(path), json.dumps(value, indent=1, ensure_ascii=False))
    except OSError as error:
        raise UserError(f"{path}: cannot write {what} ({error.strerror or error})") from None


def write_answers(settings: PredictSettings, predictions: dict, examples: list[SquadExample]) -> None:
    """The answers to --input's questions: to --output, or printed; scored on those with gold answers."""
    if settings.json:
        contexts = {e.id: e.context for e in examples}
        print(json.dumps({qid: answer_record(p, contexts[qid]) for qid, p in predictions.items()}, indent=2,
                         ensure_ascii=False))
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


def text_source(settings: PredictSettings, checkpoint: Path, run_config: dict):
    """--input's text (or --dataset's validation split) to score, read as train.py reads its
    validation text."""
    if settings.input and base_suffix(Path(settings.input)) == ".json":
        raise UserError(f"{settings.input}: SQuAD questions need a question-answering checkpoint; {checkpoint} is a "
                        f"{'causal LM checkpoint' if run_config else 'base model'}, which scores the perplexity of "
                        "text (.txt or .jsonl files, or a directory of them)")
    text = trained(TextSettings, settings, run_config)
    return (split_source(load_splits(settings.dataset, settings.dataset_config), "validation", settings.dataset, text)
            if settings.dataset else file_source(settings.input, text))


def score_text(settings: PredictSettings, predictor: Predictor, source) -> None:
    scores, block_size = predictor.scores(settings, source)
    if scores is None:  # not rank 0: it has them
        return
    if settings.json:
        print(json.dumps(scores, indent=2))
    else:
        print(f"{source.where}: {CLMTask.describe(scores)} (blocks of {block_size})", flush=True)
    if settings.output:
        write_json(settings.output, scores, "the scores")


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
    # What the checkpoint is asked to do, checked (and the questions or text read) before the weights load.
    if scores_text(settings, run_config):
        use = "score"
    elif settings.generating or (is_interactive(settings) and run_config.get("task", "clm") == "clm"):
        use = "generate"
        if settings.context is not None or settings.context_file:
            raise UserError(f"{settings.checkpoint}: a causal LM checkpoint answers no questions: --context is for "
                            "question answering; give prompts on standard input")
    else:
        use = "answer"
    with verified_checkpoint(checkpoint):
        check_against_model(settings, run_config, use, checkpoint)
        source = text_source(settings, checkpoint, run_config) if use == "score" else None
        examples = read_examples(settings) if use == "answer" and not is_interactive(settings) else None
    predictor = Predictor(settings, checkpoint, run_config)
    if use == "score":
        score_text(settings, predictor, source)
    elif is_interactive(settings):
        interactive(settings, predictor, answering_questions=use == "answer")
    elif use == "generate":
        print_generated(settings, predictor, read_text(settings.prompt_file) if settings.prompt_file else settings.prompt)
    else:
        predictions = predictor.answers(settings, examples, settings.many or "command line")
        if predictions is not None:  # rank 0 has them
            if settings.many:
                write_answers(settings, predictions, examples)
            else:
                print_answer(settings, predictions["question"], examples[0].context)
    close_processes()


if __name__ == "__main__":
    run_cli(main)
