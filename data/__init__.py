"""Files -> examples -> features -> batches: the Dataset classes and the shipped samples."""
from pathlib import Path

SAMPLES = Path(__file__).parent / "samples"
