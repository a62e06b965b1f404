"""Answer questions, or generate text, with a fine-tuned checkpoint.

    python predict.py --context "..." --question "..."
    python predict.py --context-file article.txt --question "..." --json
    python predict.py --input questions.jsonl --output predictions.json
    python predict.py --prompt "Once upon a time" --max-new-tokens 80 --seed 1
    python predict.py --checkpoint outputs/qa        # interactive: questions from standard input

Interactive (no --question, --input or --prompt): the model loads once, then standard input is read
line by line. For a QA checkpoint the first line is the context (or give --context/--context-file),
each later line a question about it, and a line `context: NEW TEXT` changes the context. For a
causal LM checkpoint each line is a prompt. An answer (or continuation) is printed per line; a bad
line gets an error line and the session goes on; end of input (Ctrl-D) ends it.

Works with every checkpoint train.py writes (extractive, seq2seq, decoder-only, LoRA adapter,
merged LoRA, causal LM), and uses the same windowing, forward pass and answer selection as evaluation.
"""
import argparse
import json
import logging
import sys
from pathlib import Path

from clm.generation import generate_text, prompt_ids
from data.squad import SquadExample, SquadExamples
from data.text_files import read_text
from engine.checkpoint import atomic_write_text, find_checkpoint, load_run_config, verified_checkpoint
from engine.device import configure_device, out_of_memory_as_error, pick_device, pick_precision
from engine.errors import UserError, run_cli
from models.backbones import load_tokenizer
from models.attention import AUTO, choose_attention, is_decoder_only, set_attention
from models.transfer import load_trained_model
from qa.metrics import squad_scores
from qa.styles import make_qa
from qa.task import QATask


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint",
                   help="checkpoint directory written by train.py, or a run's output directory to use its best/ "
                        "(default: outputs/qa, with --prompt outputs/clm)")
    p.add_argument("--question", help="the question to answer")
    context = p.add_mutually_exclusive_group()
    context.add_argument("--context", help="the text that contains the answer")
    context.add_argument("--context-file", help="read the context from this UTF-8 text file")
    p.add_argument("--input", help="many questions at once: SQuAD JSON or JSON Lines, as for training (answers optional)")
    p.add_argument("--output", help="with --input: write {id: answer} predictions here (default: print them)")
    p.add_argument("--json", action="store_true", help="print answer, score and character offsets as JSON")
    p.add_argument("--batch-size", type=int, default=64, help="windows per forward pass (default: 64)")
    p.add_argument("--null-score-diff-threshold", type=float,
                   help="extractive: answer 'no answer' when null score minus best span score exceeds this (default: "
                        "the checkpoint's, tuned on its validation set when it was trained with unanswerable questions; "
                        "else never 'no answer')")
    p.add_argument("--max-answer-tokens", type=int, help="generative: longest answer in tokens (default: as trained)")
    p.add_argument("--num-beams", type=int, help="generative: beam search width, 1 for greedy (default: as trained)")
    gen = p.add_argument_group("text generation from a causal LM checkpoint (--task clm)")
    prompt = gen.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="generate a continuation of this text, streamed as it is produced")
    prompt.add_argument("--prompt-file", help="read the prompt from this UTF-8 text file")
    gen.add_argument("--chat", action="store_true", help="put the prompt in the model's chat template as the user turn")
    gen.add_argument("--max-new-tokens", type=int, default=100, help="(default: 100)")
    gen.add_argument("--do-sample", action=argparse.BooleanOptionalAction, default=True,
                     help="sample (default) or, with --no-do-sample / --greedy, take the most likely token")
    gen.add_argument("--greedy", dest="do_sample", action="store_false", help="same as --no-do-sample")
    gen.add_argument("--temperature", type=float, default=0.8, help="(default: 0.8)")
    gen.add_argument("--top-k", type=int, default=50, help="(default: 50; 0 for no limit)")
    gen.add_argument("--top-p", type=float, default=0.95, help="(default: 0.95)")
    gen.add_argument("--num-return-sequences", type=int, default=1, help="(default: 1; more than 1 is printed at the end)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed: the same seed gives the same text (default: 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps (default: auto)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto", help="(default: auto)")
    args = p.parse_args(argv)
    for name in ("batch_size", "max_answer_tokens", "num_beams", "max_new_tokens", "num_return_sequences"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    # An empty --question or --context is given, not missing: it gets the reader's "empty question" line.
    given = {name: getattr(args, name) is not None for name in ("question", "context", "context_file", "input")}
    if args.prompt is not None or args.prompt_file:
        if any(given.values()):
            p.error("--prompt generates text; it does not combine with the question-answering flags")
        args.checkpoint = args.checkpoint or "outputs/clm"
        return args
    args.checkpoint = args.checkpoint or "outputs/qa"
    if given["input"]:
        if given["question"] or given["context"] or given["context_file"]:
            p.error("--input replaces --question/--context/--context-file")
    elif given["question"] and not (given["context"] or given["context_file"]):
        p.error("give --question with --context or --context-file, or --input FILE, or no question to ask them "
                "interactively")
    return args


def is_interactive(args) -> bool:
    return args.question is None and args.input is None and args.prompt is None and not args.prompt_file


def given_context(args) -> str | None:
    return read_text(args.context_file) if args.context_file else args.context


def one_question(qid: str, context: str, question: str, where: str) -> list[SquadExample]:
    """A question checked as the file readers check theirs (empty text, length)."""
    record = {"id": qid, "context": context, "question": question}
    return SquadExamples.from_records([(where, record)], where, require_answers=False).examples


def read_examples(args) -> list[SquadExample]:
    if args.input:
        return SquadExamples.load(args.input, require_answers=False).examples
    return one_question("question", given_context(args), args.question, args.context_file or "command line")


def load_checkpoint(args, generating: bool | None):
    """The settings, tokenizer and model of the checkpoint, checked against its manifest as they load.
    `generating` None (interactive): whatever the checkpoint does, text generation for --task clm."""
    checkpoint = find_checkpoint(Path(args.checkpoint), "best")
    with verified_checkpoint(checkpoint):
        settings = load_run_config(checkpoint)
        if generating is None:
            generating = settings.get("task") == "clm"
        if generating and settings.get("model_kind") != "causal-lm":
            raise UserError(f"{checkpoint}: --prompt needs a causal LM checkpoint (train.py --task clm, or generative "
                            "QA with a decoder-only model)")
        if not generating and settings.get("task") != "qa":
            why = f"trained with --task {settings['task']}; generate from it with --prompt" if settings else "no run_config.json"
            raise UserError(f"{checkpoint}: not a question-answering checkpoint written by train.py ({why})")
        tokenizer = load_tokenizer(str(checkpoint))
        if args.chat and not tokenizer.chat_template:
            raise UserError(f"{checkpoint}: --chat needs a tokenizer with a chat template, and this one has none")
        model = load_trained_model(checkpoint, settings)
    return settings, tokenizer, model, generating


def generate(args, text: str, tokenizer, model, device, precision: str) -> None:
    """Continue `text` with a causal LM checkpoint (any train.py checkpoint of one)."""
    stream = args.num_return_sequences == 1
    texts = generate_text(model, tokenizer, prompt_ids(tokenizer, text, args.chat), vars(args), device, precision, stream)
    if not stream:  # a streamed text ends with its own newline
        for number, generated in enumerate(texts, start=1):
            print(f"--- {number}\n{generated}")


def answer(args, qa, model, examples: list[SquadExample], where: str, device, precision: str) -> dict:
    """{question id: prediction}: the same windows, forward pass and answer selection as evaluation."""
    features = qa.features(examples, where)
    with out_of_memory_as_error(device, f"answering batches of {args.batch_size} windows", "lower --batch-size"):
        return qa.answer_questions(model, features, device, precision, args.batch_size)


def print_answer(args, prediction) -> None:
    if args.json:
        print(json.dumps(prediction.as_record(), indent=2, ensure_ascii=False), flush=True)
    else:
        print(prediction.text or "(no answer)", flush=True)


def interactive(args, qa, tokenizer, model, device, precision: str) -> None:
    """Lines from standard input, the model loaded once (see the module's docstring); `qa` None for a
    causal LM. A mistake in one line is reported and the session goes on."""
    terminal = sys.stdin.isatty()
    context = given_context(args) if qa else None
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
                generate(args, line, tokenizer, model, device, precision)
            elif line.lower().startswith("context:"):
                context = line[len("context:"):].strip()
            elif context is None:
                context = line
            else:
                asked += 1
                qid, where = f"question-{asked}", f"standard input, line {number}"
                examples = one_question(qid, context, line, where)
                print_answer(args, answer(args, qa, model, examples, where, device, precision)[qid])
        except UserError as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
        ask()


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    generating = None if is_interactive(args) else args.prompt is not None or bool(args.prompt_file)
    examples = read_examples(args) if generating is False else None  # checked before the slow loading
    if args.output and not Path(args.output).absolute().parent.is_dir():
        raise UserError(f"--output {args.output}: the directory {Path(args.output).absolute().parent} does not exist")
    settings, tokenizer, model, generating = load_checkpoint(args, generating)
    device = pick_device(args.device)
    precision, _ = pick_precision(args.precision, device)
    configure_device(device)
    model = model.to(device)
    set_attention(model, choose_attention(AUTO, device, precision, is_decoder_only(model))[0])
    if generating and (args.context is not None or args.context_file):
        raise UserError(f"{args.checkpoint}: a causal LM checkpoint answers no questions: --context is for question "
                        "answering; give prompts on standard input")
    if generating and not is_interactive(args):
        generate(args, read_text(args.prompt_file) if args.prompt_file else args.prompt, tokenizer, model, device, precision)
        return
    overrides = {"max_answer_tokens": args.max_answer_tokens, "num_beams": args.num_beams}
    settings.update({name: value for name, value in overrides.items() if value is not None})
    if args.null_score_diff_threshold is not None:
        if settings.get("qa_style") != "extractive":
            raise UserError(f"{args.checkpoint}: --null-score-diff-threshold is for extractive checkpoints; this one "
                            "generates its answers (an empty one is its 'no answer')")
        settings.update(allow_null=True, null_threshold=args.null_score_diff_threshold)
    qa = None if generating else make_qa(settings, tokenizer)
    if is_interactive(args):
        interactive(args, qa, tokenizer, model, device, precision)
        return
    predictions = answer(args, qa, model, examples, args.input or "command line", device, precision)
    if not args.input:
        print_answer(args, predictions["question"])
    elif args.json:
        print(json.dumps({qid: p.as_record() for qid, p in predictions.items()}, indent=2, ensure_ascii=False))
    answers = {qid: p.text for qid, p in predictions.items()}
    if args.input:
        if args.output:
            try:
                atomic_write_text(Path(args.output), json.dumps(answers, indent=1, ensure_ascii=False))
            except OSError as error:
                raise UserError(f"{args.output}: cannot write the predictions ({error.strerror or error})") from None
            print(f"wrote {len(answers)} answers to {args.output}", file=sys.stderr)
        elif not args.json:
            print(json.dumps(answers, indent=1, ensure_ascii=False))
        answered = [e for e in examples if e.has_gold]
        if answered:
            print(f"scored on the questions with gold answers: {QATask.describe(squad_scores(answers, answered))}",
                  file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
