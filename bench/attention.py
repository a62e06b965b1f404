"""Benchmark: each attention kernel train.py can choose (`--attention`), per precision, at the shapes
of the shipped models.

    python bench/attention.py [--repeats 7]

One layer's attention as transformers calls it (the functions behind `attn_implementation`), on
random queries, keys and values of two shapes:

- MiniLM-L6 (extractive QA): 16 windows x 12 heads x 384 tokens x 32, a padding mask on 4 rows;
- SmolLM2-135M (causal LM): 8 blocks x 9 query heads (3 key/value heads) x 256 tokens x 64, causal.

For fp32 and for bf16 autocast: `sdpa`, `sdpa-fp32` (models/attention.py) and `eager`, each as the
median of `--repeats` timed calls after one warm-up, forward alone (evaluation) and forward +
backward (training). The last column is what `--attention auto` picks for that precision on this
CPU. Writes a Markdown table to stdout and to `--report`.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.machine import cpu_description  # noqa: E402
from bench.qa_squad import write_report  # noqa: E402
from models.attention import EAGER, SDPA, SDPA_FP32, choose_attention, sdpa_in_fp32  # noqa: E402


class Layer(torch.nn.Module):
    """What the attention functions read from the attention module that calls them."""

    def __init__(self, causal: bool, groups: int):
        super().__init__()
        self.is_causal, self.num_key_value_groups = causal, groups


def shapes() -> dict:
    from transformers.models.bert.modeling_bert import eager_attention_forward as bert_eager
    from transformers.models.llama.modeling_llama import eager_attention_forward as llama_eager

    return {  # name: (batch, query heads, key/value heads, tokens, head size, causal, the model's eager function)
        "MiniLM-L6, 16 x 384": (16, 12, 12, 384, 32, False, bert_eager),
        "SmolLM2-135M, 8 x 256": (8, 9, 3, 256, 64, True, llama_eager),
    }


def inputs(batch, heads, kv_heads, tokens, size, causal, precision):
    """Queries, keys and values as the model hands them over: in bf16 under autocast (they come out
    of bf16 linear layers), with an additive mask built as transformers builds it for SDPA."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    q = torch.randn(batch, heads, tokens, size, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(batch, kv_heads, tokens, size, dtype=dtype, requires_grad=True) for _ in range(2))
    if causal:
        return q, k, v, None
    mask = torch.ones(batch, 1, tokens, tokens, dtype=torch.bool)
    mask[:4, ..., tokens * 3 // 4:] = False  # 4 padded windows
    return q, k, v, mask


def kernel(choice: str, eager):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return {SDPA: sdpa_attention_forward, SDPA_FP32: sdpa_in_fp32, EAGER: eager}[choice]


def time_call(call, repeats: int) -> float:
    call()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def measure(shape, choice: str, precision: str, repeats: int) -> tuple[float, float]:
    """(forward seconds, forward + backward seconds)."""
    batch, heads, kv_heads, tokens, size, causal, eager = shape
    layer = Layer(causal, heads // kv_heads)
    q, k, v, mask = inputs(batch, heads, kv_heads, tokens, size, causal, precision)
    if choice == EAGER and mask is not None:
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    function = kernel(choice, eager)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    def forward():
        with autocast, torch.no_grad():
            function(layer, q, k, v, mask, scaling=size**-0.5, dropout=0.0)

    def training():
        with autocast:
            output, _ = function(layer, q, k, v, mask, scaling=size**-0.5, dropout=0.0)
        output.float().sum().backward()

    return time_call(forward, repeats), time_call(training, repeats)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--report", type=Path, default=ROOT / "bench" / "results" / "attention.md")
    args = p.parse_args()
    lines = [f"# Attention kernels per precision ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {cpu_description()}; {torch.get_num_threads()} torch threads. One layer's attention, median "
             f"of {args.repeats} calls after a warm-up; ms. Ratios are against `sdpa` in the same precision.", "",
             "| shape | precision | kernel | forward ms | vs sdpa | forward + backward ms | vs sdpa | auto picks |",
             "|---|---|---|---|---|---|---|---|"]
    for name, shape in shapes().items():
        for precision in ("fp32", "bf16"):
            picked = choose_attention("auto", torch.device("cpu"), precision, decoder_only=shape[5])[0]
            times = {choice: measure(shape, choice, precision, args.repeats) for choice in (SDPA, SDPA_FP32, EAGER)}
            for choice, (forward, training) in times.items():
                lines.append(f"| {name} | {precision} | `{choice}` | {forward * 1e3:.1f} | "
                             f"{times[SDPA][0] / forward:.2f}x | {training * 1e3:.1f} | {times[SDPA][1] / training:.2f}x | "
                             f"{'yes' if choice == picked else ''} |")
    write_report(args.report, lines)


if __name__ == "__main__":
    main()
