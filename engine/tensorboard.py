"""TensorBoard for a run: rank 0 writes its scalars, text and HParams; the other processes write nothing."""
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from engine.distributed import is_main


class NoWriter:
    """TensorBoard for the processes other than rank 0: they write nothing."""

    def add_scalar(self, *args, **kwargs):
        pass

    add_text = close = add_scalar


def run_writer(directory: Path) -> SummaryWriter | NoWriter:
    return SummaryWriter(directory) if is_main() else NoWriter()


def write_hparams(writer, settings: dict, metric_tags: list[str], finished: bool = False) -> None:
    """The run's main settings, and the scalar tags shown beside them (its last and best metric, ...),
    for TensorBoard's HParams dashboard: `tensorboard --logdir outputs` then compares the runs under
    outputs/ by their settings. Written as the run starts (the settings) and again when it finishes
    (its status)."""
    if isinstance(writer, NoWriter):
        return
    settings = {name: "none" if value is None else value for name, value in settings.items()}
    experiment, start, end = hparams(settings, dict.fromkeys(metric_tags, 0.0))
    for summary in ((end,) if finished else (experiment, start)):
        writer.file_writer.add_summary(summary)
