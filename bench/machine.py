"""Facts about the machine a benchmark runs on: what the CPU is, how fast it multiplies matrices,
and how many FLOPs a training token costs, so that throughput can be read against the hardware."""
import os
import platform
import time

import torch

from engine.device import cpuinfo_field

# (name in reports, /proc/cpuinfo flag) of the vector extensions below AMX, fastest first
VECTOR_FEATURES = (("AVX512-BF16", "avx512_bf16"), ("AVX512F", "avx512f"), ("AVX2", "avx2"))


def cpu_flags() -> set[str]:
    return set((cpuinfo_field("flags") or "").split())


def has_amx() -> bool:
    """AMX tiles with bf16 support: the CPUs on which bf16 matmuls beat fp32 by several times."""
    return {"amx_bf16", "amx_tile"} <= cpu_flags()


def cpu_description() -> str:
    """One line naming the CPU, its core count, its vector extensions and the library versions,
    e.g. "AMD EPYC 7B13, 2 CPUs, AVX2 (no AVX512, no AMX); torch 2.13.0+cpu, transformers 5.23.0"."""
    import transformers

    flags, amx = cpu_flags(), has_amx()
    name = cpuinfo_field("model name") or platform.processor() or platform.machine()
    present = ["AMX"] * amx + [label for label, flag in VECTOR_FEATURES if flag in flags]
    absent = [label for label, missing in (("AVX2", "avx2" not in flags), ("AVX512", "avx512f" not in flags),
                                           ("AMX", not amx)) if missing]
    notes = ", ".join(f"no {label}" for label in absent)
    features = f"{', '.join(present)} ({notes})" if present and absent else ", ".join(present) or notes
    return (f"{name}, {os.cpu_count()} CPUs, {features}; "
            f"torch {torch.__version__}, transformers {transformers.__version__}")


def matmul_peak_flops(dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """Measured FLOP/s of a square `torch.mm` at `dtype` in this process (with its torch thread
    count): the fastest of `repeats` timings after one warm-up, as the machine's practical peak (on
    a shared virtual machine the median moved by a third from run to run)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        seconds.append(time.perf_counter() - started)
    return 2 * size**3 / min(seconds)


def training_flops_per_token(parameters: int, layers: int, hidden: int, context: int) -> float:
    """FLOPs of one training token (forward and backward). `parameters` are those used in matmuls:
    every parameter except the input embedding (a lookup), with the LM head counted once even when
    it is tied to the embedding."""
    # Kaplan et al. / PaLM: 6 FLOPs per parameter per token, plus attention scores 12 * layers * hidden * seq_len
    return 6 * parameters + 12 * layers * hidden * context


def matmul_parameters(model: torch.nn.Module) -> int:
    """Parameters of the linear layers: the weights every token is multiplied by (embeddings are
    lookups; a head tied to the embedding is one linear module, counted once)."""
    return sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters(recurse=False))


def model_on_meta(path: str, kind: str) -> torch.nn.Module:
    """The model of a configuration, with no weights allocated or loaded: enough to count parameters."""
    from models.backbones import load_config
    from transformers import AutoModelForCausalLM, AutoModelForQuestionAnswering

    auto_class = {"causal-lm": AutoModelForCausalLM, "span": AutoModelForQuestionAnswering}[kind]
    with torch.device("meta"):
        return auto_class.from_config(load_config(path))
