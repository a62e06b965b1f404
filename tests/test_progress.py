"""Progress bars (engine/progress.py): drawn on a terminal, silent in logs and pipes."""
import io

import pytest

from data.squad import SquadExamples
from conftest import VALIDATION_SAMPLE


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stream, drawn", [(Terminal(), True), (io.StringIO(), False)])
def test_reading_a_file_shows_progress_only_on_a_terminal(monkeypatch, stream, drawn):
    monkeypatch.setattr("sys.stderr", stream)
    examples = SquadExamples.load(str(VALIDATION_SAMPLE))
    assert len(examples) > 0
    assert ("read " + VALIDATION_SAMPLE.name in stream.getvalue()) is drawn
