"""Generative QA with SmolLM2-135M: what one epoch of full fine-tuning and of LoRA give over the
prompted model (zero-shot), at what cost in time and memory.

    python bench/qa_generative.py ../shared/data/squad-v1.1/dev-pool-v1.1.json.gz

The pool is split by article (`split_squad` in bench/harness.py); evaluation uses the first
`--eval-questions` validation questions. Each configuration runs `train.py --qa-style generative`
for one epoch in fp32 on the CPU, in a process of its own: `full` fine-tunes every weight (lr 3e-5),
`lora` trains LoRA adapters (r=8, alpha 16, every linear layer; lr 3e-4), each at train.py's
automatic learning rate. The zero-shot row is the full run's evaluation before training. One run
per row. Writes a Markdown report to stdout and to `--report`.
"""
import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root: `bench` and the product
from bench.harness import (ROOT, TRAIN, existing_file, machine_line, run_training, split_squad, table,  # noqa: E402
                           write_report)

RUNS = {"full fine-tuning": [], "LoRA r=8, all linear layers": ["--lora"]}


def row(label: str, scores: dict, results: dict | None) -> list[str]:
    """`results` None: the zero-shot row (no training)."""
    cells = [label, f"{scores['exact_match']:.2f}", f"{scores['f1']:.2f}"]
    if results is None:
        return cells + ["-", "-", f"{scores['total'] / scores['seconds']:.2f}", "-", "0"]
    trainable, total = results["trainable_parameters"], results["total_parameters"]
    return cells + [f"{results['train_seconds']:.0f}", f"{results['train_tokens_per_s']:.0f}",
                    f"{scores['total'] / scores['seconds']:.2f}", f"{results['peak_rss_mb']:.0f}",
                    f"{trainable / 1e6:.1f}M ({100 * trainable / total:.1f}%)"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pool", type=existing_file, help="SQuAD JSON(.gz), e.g. ../shared/data/squad-v1.1/dev-pool-v1.1.json.gz")
    p.add_argument("--train-questions", type=int, default=500)
    p.add_argument("--eval-questions", type=int, default=300)
    p.add_argument("--eval-articles", type=int, default=8)
    p.add_argument("--report", type=Path, default=ROOT / "bench" / "results" / "qa_generative.md")
    args = p.parse_args()

    flags = ["--qa-style", "generative", "--epochs", "1", "--precision", "fp32", "--device", "cpu", "--batch-size", "8",
             "--eval-batch-size", "32", "--max-eval-samples", str(args.eval_questions)]
    with tempfile.TemporaryDirectory() as tmp:
        workload = split_squad(args.pool, args.train_questions, args.eval_articles, Path(tmp))
        runs = {label: run_training(TRAIN, [*workload.flags, *flags, *extra], Path(tmp) / str(number))
                for number, (label, extra) in enumerate(RUNS.items())}
    full = runs["full fine-tuning"]
    lines = [
        f"Generative QA, SmolLM2-135M-Instruct (`smollm2-135m`). {workload.description}; scored on the first "
        f"{full['eval']['total']} of them ({full['eval']['windows']} windows). 1 epoch of batch 8 ({full['steps']} "
        f"optimizer steps), fp32 on the CPU, lr {full['args']['learning_rate']:.0e} (full) / "
        f"{runs['LoRA r=8, all linear layers']['args']['learning_rate']:.0e} (LoRA), warmup 10%, greedy decoding of "
        f"at most {full['args']['max_answer_tokens']} tokens, evaluation batch 32. Generation questions/s: the "
        "batched evaluation (all windows of a question generated, the best answer kept).",
        "", machine_line(), "",
        *table(["configuration", "EM", "F1", "train s", "train tokens/s", "generation questions/s", "peak RSS MB",
                "trainable parameters"],
               [row("zero-shot (prompted, no training)", full["initial_eval"], None),
                *(row(label, results["eval"], results) for label, results in runs.items())]),
    ]
    write_report(args.report, lines)


if __name__ == "__main__":
    main()
