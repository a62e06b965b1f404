"""models/dropout.py: masks with torch's keep probability and scaling, from the seeded generator,
used where they are faster and nowhere else."""
import pytest
import torch

from models.dropout import LEVELS, MaskDropout, keep_mask, use_mask_dropout

COUNT = 4_000_003  # odd, and not a multiple of 4: the last draw is cut


def test_mask_keeps_each_element_with_the_probability_and_scales_by_its_inverse():
    torch.manual_seed(0)
    p = 0.1
    mask = keep_mask(torch.Size([COUNT]), p, torch.float32, torch.device("cpu"))
    q = round((1 - p) * LEVELS) / LEVELS
    assert abs(q - (1 - p)) < 1 / LEVELS
    values = mask.unique().tolist()
    assert values[0] == 0 and values[1:] == [pytest.approx(1 / q)]
    kept = mask > 0
    sigma = (q * (1 - q) / COUNT) ** 0.5
    assert abs(kept.double().mean().item() - q) < 5 * sigma
    # Each of a draw's four 15-bit values is a fair coin: with a sign bit left in, a quarter of
    # the positions would keep everything below the threshold of a negative value, far more than q.
    for position in range(4):
        share = kept[position::4].double().mean().item()
        assert abs(share - q) < 5 * sigma * 2, position
    # The expectation of a dropped-out value is the value itself, as with torch's dropout.
    assert abs(mask.double().mean().item() - 1) < 5 * sigma / q


@pytest.mark.parametrize("p", [0.5, 0.9])
def test_keep_share_follows_p(p):
    torch.manual_seed(1)
    kept = keep_mask(torch.Size([1_000_000]), p, torch.float32, torch.device("cpu")) > 0
    assert kept.double().mean().item() == pytest.approx(1 - p, abs=5 * ((p * (1 - p)) / 1_000_000) ** 0.5)


def test_masks_come_from_the_seeded_generator():
    def draw(seed):
        torch.manual_seed(seed)
        return keep_mask(torch.Size([64, 100]), 0.1, torch.float32, torch.device("cpu"))

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))
    # A checkpoint's saved generator state replays the same masks: what a bit-exact resume needs.
    state = torch.get_rng_state()
    first = keep_mask(torch.Size([1000]), 0.1, torch.float32, torch.device("cpu"))
    torch.set_rng_state(state)
    assert torch.equal(first, keep_mask(torch.Size([1000]), 0.1, torch.float32, torch.device("cpu")))


def test_backward_uses_the_forward_mask():
    torch.manual_seed(0)
    dropout = MaskDropout(0.3)
    x = torch.randn(8, 50, 16, requires_grad=True)
    y = dropout(x)
    y.sum().backward()
    kept = y != 0
    scale = LEVELS / round(0.7 * LEVELS)
    assert torch.allclose(y[kept], x[kept] * scale)
    assert torch.equal(x.grad, kept.float() * scale)


def test_bf16_input_gives_bf16_output():
    x = torch.ones(1000, dtype=torch.bfloat16)
    assert MaskDropout(0.1)(x).dtype == torch.bfloat16


def test_eval_mode_p0_and_p1():
    x = torch.randn(10, 10)
    dropout = MaskDropout(0.5).eval()
    assert dropout(x) is x
    assert MaskDropout(0.0)(x) is x
    assert torch.equal(MaskDropout(1.0)(x), torch.zeros_like(x))


def model_with_dropouts() -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.1),
                                torch.nn.ModuleDict({"adapter": torch.nn.Dropout(0.05)}))
    model.extra = torch.nn.Dropout(0.2)
    model.off = torch.nn.Dropout(0.0)  # draws nothing: left as it is
    return model


def test_replaced_on_the_cpu_in_eager_mode_only():
    model = model_with_dropouts()
    assert use_mask_dropout(model, torch.device("cpu"), compiled=False) == 3
    assert [type(m) for m in model.modules() if isinstance(m, torch.nn.Dropout)] == [MaskDropout] * 3 + [
        torch.nn.Dropout]
    assert [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)] == [0.1, 0.05, 0.2, 0.0]
    # torch's own dropout is one fused kernel on a GPU, and torch.compile generates its own.
    for device, compiled in ((torch.device("cuda"), False), (torch.device("cpu"), True)):
        model = model_with_dropouts()
        assert use_mask_dropout(model, device, compiled) == 0
        assert not any(isinstance(m, MaskDropout) for m in model.modules())


def test_training_setup_uses_it_for_the_model(tiny_model_dir, tmp_path):
    """train.py's setup gives the tiny BERT (hidden dropout 0.1) mask dropout on the CPU: the resume
    and torchrun tests of tests/test_reliability.py and tests/test_distributed.py run through it."""
    import train
    from conftest import tiny_args

    args = train.parse_settings(tiny_args(tiny_model_dir, tmp_path))
    run = train.setup(args, torch.device("cpu"))
    dropouts = [m for m in run.model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    assert dropouts and all(type(m) is MaskDropout for m in dropouts)
