"""Dropout whose masks are cheap to draw on the CPU.

torch's dropout draws its mask with `bernoulli_`, which on the CPU runs on one thread and draws a
53-bit double per element: 16% of a bf16 MiniLM training step on a 2-core AMX Xeon, 6% of an fp32
one on an AMD EPYC (bench/results/profile_step.md). `MaskDropout` draws 63 random bits per four
elements from the same generator and keeps an element when its 15 bits fall under the keep
threshold: a quarter of the draws, and compares of 16-bit integers.

The keep probability is rounded to a multiple of 2^-15 (0.9 becomes 0.899994), and the kept values
are scaled by the inverse of that exact probability, so every output's expectation is its input,
as with torch's dropout. Masks come from torch's default generator, so `--seed` fixes them and a
checkpoint's saved random state resumes them bit for bit.

On CUDA (one fused kernel per dropout) and under torch.compile (which generates its own threaded
dropout) torch's dropout is kept: see `use_mask_dropout`, and `MaskDropout.forward` in a model
compiled once it ran.
"""
import torch
from torch.autograd.profiler import record_function

LEVELS = 1 << 15  # a mask element's random value is 15 bits


def keep_mask(shape: torch.Size, p: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """1 / q where an element is kept, with probability q = 1 - p rounded to a multiple of 2^-15,
    else 0; in `dtype`, so that applying it is a multiply of one dtype (torch multiplies mixed
    dtypes element by element, several times slower)."""
    threshold = max(1, round((1 - p) * LEVELS))
    count = shape.numel()
    with record_function("dropout mask"):  # its name in profiles (bench/profile_step.py)
        # random_() fills an int64 with 63 random bits (bit 63 is 0). Seen as four int16, the top
        # one's sign bit is 0 and the others' random: dropping bit 15 from each leaves four uniform
        # 15-bit values per draw.
        bits = torch.empty((count + 3) // 4, dtype=torch.int64, device=device).random_()
        values = bits.view(torch.int16)[:count].bitwise_and_(LEVELS - 1)
        return (values < threshold).to(dtype).mul_(LEVELS / threshold).view(shape)


class MaskDropout(torch.nn.Dropout):
    """A drop-in `nn.Dropout` (same `p`; `inplace` ignored) drawing its mask with `keep_mask`. The
    backward pass multiplies by the same saved mask."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if torch.compiler.is_compiling():  # a model compiled after its first steps (--compile auto)
            return torch.nn.functional.dropout(x, self.p, training=True)
        if self.p == 1:
            return x * 0
        return x * keep_mask(x.shape, self.p, x.dtype, x.device)


def use_mask_dropout(model: torch.nn.Module, device: torch.device, compiled: bool) -> int:
    """Replace the model's `nn.Dropout` modules by `MaskDropout` where it is faster (eager, on the
    CPU); returns how many were replaced. Models that call `functional.dropout` directly keep it, and
    a dropout of 0 (train.py's default hidden dropout) stays torch's, which returns its input."""
    if device.type != "cpu" or compiled:
        return 0
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Dropout and child.p > 0:
                setattr(parent, name, MaskDropout(child.p))
                replaced += 1
    return replaced
