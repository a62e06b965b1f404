"""Answer questions with a fine-tuned checkpoint.

    python predict.py --context "..." --question "..."
    python predict.py --context-file article.txt --question "..." --json
    python predict.py --input questions.jsonl --output predictions.json

Works with every checkpoint train.py writes (extractive, seq2seq, decoder-only, LoRA adapter,
merged LoRA), and uses the same windowing, forward pass and answer selection as evaluation.
"""
import argparse
import json
import logging
import sys
from pathlib import Path

from data.squad import SquadExample, SquadExamples
from engine.checkpoint import find_checkpoint, load_run_config
from engine.device import pick_device, pick_precision
from engine.errors import UserError, run_cli
from models.backbones import load_tokenizer
from qa.metrics import squad_scores
from qa.styles import load_qa_model, make_qa


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="outputs/qa/best",
                   help="checkpoint directory written by train.py (default: outputs/qa/best)")
    p.add_argument("--question", help="the question to answer")
    context = p.add_mutually_exclusive_group()
    context.add_argument("--context", help="the text that contains the answer")
    context.add_argument("--context-file", help="read the context from this UTF-8 text file")
    p.add_argument("--input", help="many questions at once: SQuAD JSON or JSON Lines, as for training (answers optional)")
    p.add_argument("--output", help="with --input: write {id: answer} predictions here (default: print them)")
    p.add_argument("--json", action="store_true", help="print answer, score and character offsets as JSON")
    p.add_argument("--batch-size", type=int, default=64, help="windows per forward pass (default: 64)")
    p.add_argument("--max-answer-tokens", type=int, help="generative: longest answer in tokens (default: as trained)")
    p.add_argument("--num-beams", type=int, help="generative: beam search width, 1 for greedy (default: as trained)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps (default: auto)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto", help="(default: auto)")
    args = p.parse_args(argv)
    for name in ("batch_size", "max_answer_tokens", "num_beams"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.input:
        if args.question or args.context or args.context_file:
            p.error("--input replaces --question/--context/--context-file")
    elif not args.question or not (args.context or args.context_file):
        p.error("give --question with --context or --context-file, or --input FILE")
    return args


def read_examples(args) -> list[SquadExample]:
    if args.input:
        return SquadExamples.load(args.input, require_answers=False).examples
    context = args.context
    if args.context_file:
        try:
            context = Path(args.context_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise UserError(f"{args.context_file}: cannot read ({error})") from None
    record = {"id": "question", "context": context, "question": args.question}
    return SquadExamples.from_records([("command line", record)], "command line", require_answers=False).examples


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    checkpoint = find_checkpoint(Path(args.checkpoint))
    settings = load_run_config(checkpoint)
    if settings.get("task") != "qa":
        raise UserError(f"{checkpoint}: not a question-answering checkpoint written by train.py (no run_config.json)")
    for name in ("max_answer_tokens", "num_beams"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    examples = read_examples(args)
    device = pick_device(args.device)
    precision = pick_precision(args.precision, device)
    qa = make_qa(settings, load_tokenizer(str(checkpoint)))
    features = qa.features(examples, args.input or "command line")
    model = load_qa_model(checkpoint, settings).to(device)
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
            scores = squad_scores(answers, answered)
            print(f"EM {scores['exact_match']:.2f}  F1 {scores['f1']:.2f} on {scores['total']} questions with gold answers",
                  file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
