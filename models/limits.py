"""How many positions a model has, read from its configuration (cheap: no weights), so that length
flags past them are one error line at the start of a run (train.py's task setup, predict.py) instead
of an index error deep in the model, or text silently run past the context the model knows.

`max_position_embeddings` (transformers maps GPT-2's n_positions to it) is the size of a learned
position table (BERT, MiniLM, GPT-2, BART), past which the model fails with an index error, or the
context a rotary model was trained for (Llama, SmolLM2), past which it runs on positions it never
saw. T5 has relative positions and no such limit: only memory bounds its lengths. Which flags share
the positions is said where they are used: qa/task.py, clm/task.py, clm/generation.py.
"""
from engine.errors import UserError

POSITIONS = "max_position_embeddings"


def positions(config) -> int | None:
    """The model's positions, or None where they are relative (T5)."""
    return getattr(config, POSITIONS, None)


def check_positions(config, model: str, lengths: dict[str, int]) -> None:
    """Refuse the flags among `lengths` ({"--max-seq-length": 384}, or with other tokens they share
    the positions with: {"--max-new-tokens": 100, "prompt token": 1}) when together they are more
    than the positions of `model` (its name as the user gave it)."""
    limit = positions(config)
    if limit is None or sum(lengths.values()) <= limit:
        return
    used = " + ".join(f"{name} {value}" if name.startswith("--") else f"{value} {name}" for name, value in lengths.items())
    raise UserError(f"{used} is above {model}'s {limit} positions ({POSITIONS})")
