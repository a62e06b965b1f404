"""Batches: which features go together (the training order) and how they are padded."""
import numpy as np
import torch


class TrainBatches:
    """The training order: lists of feature indices, a pure function of (seed, epoch).

    Because the order can be recomputed, a resumed run only needs the epoch and the number of
    batches already consumed to continue exactly where it stopped.

    With `group_by_length`, batches hold features of similar length, so dynamic padding wastes
    almost nothing. Plain length sorting also puts questions on the same paragraph (nearly equal
    lengths) into one batch, which hurts accuracy; so features of a paragraph are first spread
    evenly over the epoch, then sorted by length only inside mega-batches of `mega_batches`
    batches, and finally the batches are shuffled.
    """

    def __init__(self, lengths, paragraph_ids, batch_size: int, seed: int, group_by_length: bool, mega_batches: int = 32):
        self.lengths = np.asarray(lengths)
        self.paragraph_ids = np.asarray(paragraph_ids)
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.mega_batches = mega_batches

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def for_epoch(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        if not self.group_by_length:
            order = rng.permutation(len(self.lengths))
            return [order[i : i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size)]
        order = self._spread_paragraphs(rng)
        mega = self.batch_size * self.mega_batches
        batches = []
        for i in range(0, len(order), mega):
            chunk = order[i : i + mega]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batches += [chunk[j : j + self.batch_size].tolist() for j in range(0, len(chunk), self.batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def _spread_paragraphs(self, rng) -> np.ndarray:
        """A random order in which the k features of a paragraph sit about len/k positions apart."""
        _, inverse, counts = np.unique(self.paragraph_ids, return_inverse=True, return_counts=True)
        rank = np.empty(len(inverse), dtype=np.int64)  # position of each feature within its paragraph
        shuffled = rng.permutation(len(inverse))
        by_paragraph = shuffled[np.argsort(inverse[shuffled], kind="stable")]
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        rank[by_paragraph] = np.arange(len(inverse)) - np.repeat(starts, counts)
        phase = rng.random(len(counts))[inverse]
        key = (rank + phase) / counts[inverse] + rng.random(len(inverse)) * 1e-6
        return np.argsort(key)


class PadToLongest:
    """Collate features into a batch padded only to its longest member (dynamic padding)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        batch = {
            "input_ids": torch.full((len(features), length), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(features), length), dtype=torch.long),
        }
        if "token_type_ids" in features[0]:
            batch["token_type_ids"] = torch.zeros((len(features), length), dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            batch["input_ids"][row, :n] = torch.tensor(feature["input_ids"])
            batch["attention_mask"][row, :n] = 1
            if "token_type_ids" in batch:
                batch["token_type_ids"][row, :n] = torch.tensor(feature["token_type_ids"])
        for key in ("start_positions", "end_positions", "feature_index"):
            batch[key] = torch.tensor([f[key] for f in features])
        return batch
