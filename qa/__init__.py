"""Question answering: span post-processing and the official SQuAD metrics."""
