"""engine/storage.py in two processes joined by gloo (without torchrun): a cache is built by the
first process of a node and found by the others, and a process other than rank 0 can write a model
(a node's copy of a checkpoint, or of a dequantized GGUF model). Which processes share an output directory, the
checkpoints each node writes and the ones sent to an empty disk are tested end to end, on two
"nodes" with disks of their own, in tests/test_resume.py."""
import os
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from transformers import BertConfig, BertModel

from engine.checkpoint import saving_on_any_rank
from engine.storage import once_per_node, output_storage


def build_or_find(rank: int, directory: Path, store_file: Path) -> None:
    os.environ["LOCAL_RANK"] = str(rank)  # one node of two processes
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=2)
    cache = directory / "cache"

    def work():
        found = cache.exists()
        if not found:
            cache.write_text(f"built by rank {rank}")
        return found

    found = once_per_node(work)
    (directory / f"rank-{rank}").write_text(f"{found} {output_storage(directory / 'out').describe(Path('out'))}")
    model = BertModel(BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                                 intermediate_size=8))
    model.save_pretrained(directory / f"plain-{rank}")
    with saving_on_any_rank(model):
        model.save_pretrained(directory / f"any-rank-{rank}")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    """The directory where `build_or_find` left what two processes did."""
    directory = tmp_path_factory.mktemp("two-processes")
    mp.spawn(build_or_find, args=(directory, directory / "store"), nprocs=2)
    return directory


def test_a_cache_is_built_by_the_first_process_and_found_by_the_other(two_processes):
    assert (two_processes / "cache").read_text() == "built by rank 0"
    shared = "output directory out shared by all 2 processes: rank 0 writes the checkpoints"
    assert (two_processes / "rank-0").read_text() == f"False {shared}"
    assert (two_processes / "rank-1").read_text() == f"True {shared}"


def test_a_process_other_than_rank_0_writes_a_model_when_asked(two_processes):
    """transformers' save_pretrained writes nothing on a process other than rank 0 of a process group:
    `saving_on_any_rank` lets it write (ranks 0 and 1 both)."""
    assert not (two_processes / "plain-1" / "config.json").exists()  # the trap the helper is for
    for rank in (0, 1):
        assert {"config.json", "model.safetensors"} <= {p.name for p in (two_processes / f"any-rank-{rank}").iterdir()}
