"""Answer questions, or generate text, with a fine-tuned checkpoint.

    python predict.py --context "..." --question "..."
    python predict.py --context-file article.txt --question "..." --json
    python predict.py --input questions.jsonl --output predictions.json
    python predict.py --prompt "Once upon a time" --max-new-tokens 80 --seed 1

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
from engine.checkpoint import find_checkpoint, load_run_config, verified_checkpoint
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
    elif not given["question"] or not (given["context"] or given["context_file"]):
        p.error("give --question with --context or --context-file, or --input FILE")
    return args


def read_examples(args) -> list[SquadExample]:
    if args.input:
        return SquadExamples.load(args.input, require_answers=False).examples
    context = read_text(args.context_file) if args.context_file else args.context
    record = {"id": "question", "context": context, "question": args.question}
    where = args.context_file or "command line"
    return SquadExamples.from_records([(where, record)], where, require_answers=False).examples


def load_checkpoint(args, generating: bool):
    """The settings, tokenizer and model of the checkpoint, checked against its manifest as they load."""
    checkpoint = find_checkpoint(Path(args.checkpoint), "best")
    with verified_checkpoint(checkpoint):
        settings = load_run_config(checkpoint)
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
    return settings, tokenizer, model


def generate(args, tokenizer, model, device, precision: str) -> None:
    """--prompt: continue the prompt with a causal LM checkpoint (any train.py checkpoint of one)."""
    text = read_text(args.prompt_file) if args.prompt_file else args.prompt
    stream = args.num_return_sequences == 1
    texts = generate_text(model, tokenizer, prompt_ids(tokenizer, text, args.chat), vars(args), device, precision, stream)
    if stream:
        print()
    else:
        for number, generated in enumerate(texts, start=1):
            print(f"--- {number}\n{generated}")


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    generating = args.prompt is not None or bool(args.prompt_file)
    examples = None if generating else read_examples(args)  # the user's input is checked before the slow loading
    settings, tokenizer, model = load_checkpoint(args, generating)
    device = pick_device(args.device)
    precision, _ = pick_precision(args.precision, device)
    configure_device(device)
    model = model.to(device)
    set_attention(model, choose_attention(AUTO, device, precision, is_decoder_only(model))[0])
    if generating:
        generate(args, tokenizer, model, device, precision)
        return
    overrides = {"max_answer_tokens": args.max_answer_tokens, "num_beams": args.num_beams}
    settings.update({name: value for name, value in overrides.items() if value is not None})
    if args.null_score_diff_threshold is not None:
        if settings["qa_style"] != "extractive":
            raise UserError(f"{args.checkpoint}: --null-score-diff-threshold is for extractive checkpoints; this one "
                            "generates its answers (an empty one is its 'no answer')")
        settings.update(allow_null=True, null_threshold=args.null_score_diff_threshold)
    qa = make_qa(settings, tokenizer)
    features = qa.features(examples, args.input or "command line")
    with out_of_memory_as_error(device, f"answering batches of {args.batch_size} windows", "lower --batch-size"):
        predictions = qa.answer_questions(model, features, device, precision, args.batch_size)

    if args.json:
        records = {qid: p.as_record() for qid, p in predictions.items()}
        print(json.dumps(records if args.input else records["question"], indent=2, ensure_ascii=False))
    elif not args.input:
        print(predictions["question"].text or "(no answer)")
    answers = {qid: p.text for qid, p in predictions.items()}
    if args.input:
        if args.output:
            Path(args.output).write_text(json.dumps(answers, indent=1, ensure_ascii=False))
            print(f"wrote {len(answers)} answers to {args.output}", file=sys.stderr)
        elif not args.json:
            print(json.dumps(answers, indent=1, ensure_ascii=False))
        answered = [e for e in examples if e.has_gold]
        if answered:
            print(f"scored on the questions with gold answers: {QATask.describe(squad_scores(answers, answered))}",
                  file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
