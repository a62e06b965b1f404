"""Training order (TrainBatches) and dynamic padding (PadToLongest)."""
import numpy as np
import pytest
import torch

from conftest import TRAIN_SAMPLE
from data.batching import PadToLongest, TrainBatches, length_sorted_pieces, without_needless_mask
from data.qa_features import SquadFeatures
from data.squad import SquadExamples


def paragraph_data(paragraphs=100, questions=5, seed=0, jitter=3):
    """Lengths equal within a paragraph up to +/- `jitter` tokens of question."""
    rng = np.random.default_rng(seed)
    base = rng.integers(100, 380, paragraphs)
    lengths = np.repeat(base, questions) + rng.integers(-jitter, jitter + 1, paragraphs * questions)
    paragraph_ids = np.repeat(np.arange(paragraphs), questions)
    return lengths, paragraph_ids


def padded_waste(batches, lengths):
    """Padding tokens: each batch is padded to its longest member."""
    return sum(int(lengths[b].max()) * len(b) - int(lengths[b].sum()) for b in batches)


@pytest.fixture(scope="module")
def sample_features(tokenizer):
    return SquadFeatures(SquadExamples.load(str(TRAIN_SAMPLE)).examples, tokenizer)


@pytest.mark.parametrize("group_by_length", [True, False])
@pytest.mark.parametrize("n, batch_size", [(500, 16), (233, 16), (37, 4), (5, 8), (1000, 7)])
def test_each_epoch_is_a_partition(group_by_length, n, batch_size):
    rng = np.random.default_rng(n)
    lengths = rng.integers(20, 384, n)
    paragraph_ids = rng.integers(0, max(1, n // 4), n)
    batches = TrainBatches(lengths, paragraph_ids, batch_size, seed=3, group_by_length=group_by_length)
    for epoch in range(3):
        epoch_batches = batches.for_epoch(epoch)
        flat = [i for b in epoch_batches for i in b]
        assert sorted(flat) == list(range(n))
        assert all(1 <= len(b) <= batch_size for b in epoch_batches)
        assert all(isinstance(i, int) for i in flat)
        assert len(epoch_batches) == len(batches)
        # Batches are (nearly all) full: about ceil(n / batch_size) of them.
        assert len(epoch_batches) <= 1.1 * -(-n // batch_size) + 1


def test_partition_with_one_huge_paragraph():
    # 60 questions on one paragraph among 40 single-question paragraphs: repeats are unavoidable,
    # but nothing may be lost or duplicated.
    lengths = np.r_[np.full(60, 200), np.arange(150, 190)]
    paragraph_ids = np.r_[np.zeros(60, int), np.arange(1, 41)]
    for group_by_length in (True, False):
        epoch_batches = TrainBatches(lengths, paragraph_ids, 8, 0, group_by_length).for_epoch(0)
        assert sorted(i for b in epoch_batches for i in b) == list(range(100))
        assert all(len(b) <= 8 for b in epoch_batches)


@pytest.mark.parametrize("group_by_length", [True, False])
def test_order_is_a_function_of_seed_and_epoch(group_by_length):
    lengths, paragraph_ids = paragraph_data()
    make = lambda seed: TrainBatches(lengths, paragraph_ids, 16, seed, group_by_length)  # noqa: E731
    assert make(1).for_epoch(0) == make(1).for_epoch(0)
    assert make(1).for_epoch(2) == make(1).for_epoch(2)
    assert make(1).for_epoch(0) != make(1).for_epoch(1)
    assert make(1).for_epoch(0) != make(2).for_epoch(0)
    # Recomputing an epoch after others gives the same order (what --resume relies on).
    batches = make(5)
    first = batches.for_epoch(3)
    batches.for_epoch(0), batches.for_epoch(7)
    assert batches.for_epoch(3) == first


def test_group_by_length_reduces_padding_on_the_sample(sample_features):
    lengths, paragraph_ids = sample_features.lengths, sample_features.paragraph_ids
    grouped = random = 0
    for seed in range(4):
        grouped += padded_waste(TrainBatches(lengths, paragraph_ids, 16, seed, True).for_epoch(0), lengths)
        random += padded_waste(TrainBatches(lengths, paragraph_ids, 16, seed, False).for_epoch(0), lengths)
    assert grouped < 0.3 * random


def test_group_by_length_reduces_padding_on_squad_like_lengths():
    # SQuAD-like windows: context of about 150 tokens (long tail up to the 384 window), ~5 questions each.
    rng = np.random.default_rng(7)
    context = np.clip(rng.lognormal(np.log(140), 0.45, 800), 30, 370).astype(int)
    lengths = np.minimum(np.repeat(context, 5) + rng.integers(8, 25, 4000), 384)
    paragraph_ids = np.repeat(np.arange(800), 5)
    for epoch in range(2):
        grouped = padded_waste(TrainBatches(lengths, paragraph_ids, 16, 0, True).for_epoch(epoch), lengths)
        random = padded_waste(TrainBatches(lengths, paragraph_ids, 16, 0, False).for_epoch(epoch), lengths)
        assert grouped < 0.2 * random


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_group_by_length_keeps_questions_of_a_paragraph_apart(seed):
    lengths, paragraph_ids = paragraph_data(seed=seed)
    batches = TrainBatches(lengths, paragraph_ids, 16, seed, True)
    for epoch in range(2):
        full = [b for b in batches.for_epoch(epoch) if len(b) == 16]
        assert len(full) >= 30
        distinct = np.mean([len(set(paragraph_ids[b].tolist())) for b in full])
        assert distinct >= 14
        # ...while still grouping by length.
        assert np.mean([np.ptp(lengths[b]) for b in full]) < 40


def test_group_by_length_with_identical_lengths_in_a_paragraph():
    lengths, paragraph_ids = paragraph_data(seed=4, jitter=0)
    full = [b for b in TrainBatches(lengths, paragraph_ids, 16, 4, True).for_epoch(0) if len(b) == 16]
    assert np.mean([len(set(paragraph_ids[b].tolist())) for b in full]) >= 14


def test_batches_are_shuffled_not_sorted_by_length():
    lengths, paragraph_ids = paragraph_data(paragraphs=400)
    epoch_batches = TrainBatches(lengths, paragraph_ids, 16, 0, True).for_epoch(0)
    longest = [int(lengths[b].max()) for b in epoch_batches]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)


def test_pad_to_longest():
    features = [
        {"input_ids": [101, 7, 8, 102], "token_type_ids": [0, 0, 1, 1], "start_positions": 2, "end_positions": 2, "feature_index": 5},
        {"input_ids": [101, 9, 102], "token_type_ids": [0, 0, 1], "start_positions": 0, "end_positions": 0, "feature_index": 3},
        {"input_ids": [101, 4, 5, 6, 7, 102], "token_type_ids": [0, 0, 1, 1, 1, 1], "start_positions": 3, "end_positions": 4, "feature_index": 0},
    ]
    batch = PadToLongest(pad_token_id=99)(features)
    assert batch["input_ids"].tolist() == [
        [101, 7, 8, 102, 99, 99],
        [101, 9, 102, 99, 99, 99],
        [101, 4, 5, 6, 7, 102],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1]]
    assert batch["start_positions"].tolist() == [2, 0, 3] and batch["end_positions"].tolist() == [2, 0, 4]
    assert batch["feature_index"].tolist() == [5, 3, 0]
    assert all(v.dtype == torch.long for v in batch.values())


def test_pad_to_longest_without_token_type_ids(sample_features):
    features = [{k: v for k, v in sample_features[i].items() if k != "token_type_ids"} for i in range(3)]
    batch = PadToLongest(0)(features)
    assert "token_type_ids" not in batch
    longest = max(len(f["input_ids"]) for f in features)
    assert batch["input_ids"].shape == (3, longest)
    assert batch["attention_mask"].sum(1).tolist() == [len(f["input_ids"]) for f in features]


def brute_force_cost(lengths: list[int], piece_cost: int) -> int:
    """Cheapest split of sorted lengths into contiguous runs, by trying every set of cut points."""
    import itertools

    n, best = len(lengths), None
    for cuts in itertools.product((False, True), repeat=n - 1):
        bounds = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [n]
        cost = sum((b - a) * lengths[b - 1] + piece_cost for a, b in zip(bounds, bounds[1:]))
        best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(5))
def test_length_sorted_pieces_partition_the_batch_at_minimal_cost(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(40, 385, size=200)
    batch = rng.choice(200, size=10, replace=False).tolist()
    pieces = length_sorted_pieces(batch, lengths, piece_cost=128)
    assert sorted(i for piece in pieces for i in piece) == sorted(batch)
    flat = [lengths[i] for piece in pieces for i in piece]
    assert flat == sorted(flat)  # pieces are contiguous runs of the length-sorted batch
    cost = sum(len(p) * max(lengths[i] for i in p) + 128 for p in pieces)
    assert cost == brute_force_cost(sorted(lengths[batch].tolist()), 128)


def test_length_sorted_pieces_keep_equal_lengths_together_and_split_extremes():
    lengths = np.array([100] * 8 + [384] * 8)
    assert len(length_sorted_pieces(list(range(16)), lengths, piece_cost=128)) == 2
    assert length_sorted_pieces(list(range(8)), lengths, piece_cost=128) == [list(range(8))]
    # A piece costs more than all the padding there is to save: keep the batch whole.
    assert len(length_sorted_pieces(list(range(16)), lengths, piece_cost=10_000)) == 1


def test_an_unpadded_batch_goes_without_a_mask_and_the_same_loss(tiny_model_dir_no_dropout):
    """Without padding the model needs no mask (transformers would ask the device whether it is all
    ones before every forward pass): dropping it changes nothing, and a padded batch keeps its mask."""
    from models.backbones import load_model
    from qa.extractive import span_loss

    collate = PadToLongest(pad_token_id=0)
    windows = [{"input_ids": [101, 7, 8, 9, 102], "start_positions": 1, "end_positions": 2},
               {"input_ids": [101, 5, 6, 4, 102], "start_positions": 3, "end_positions": 3}]
    full = collate(windows)
    unmasked = without_needless_mask(full)
    assert "attention_mask" not in unmasked and unmasked.keys() == full.keys() - {"attention_mask"}
    padded = collate([windows[0], {**windows[1], "input_ids": [101, 5, 102]}])
    assert without_needless_mask(padded) is padded
    model = load_model(str(tiny_model_dir_no_dropout), "span").eval()
    assert torch.equal(span_loss(model, unmasked), span_loss(model, full))
