"""All model work of a process on one thread; on a CPU replica, preprocessing takes turns with the model."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image

from loupe.schemas.config import JobConfig
from loupe.schemas.plan import Shard, ShardKind
from loupe.workers.models.stages import Captioning
from loupe.workers.pipeline import ShardProcessor
from loupe.workers.torch_thread import on_torch_thread


def test_calls_run_in_order_on_one_thread_and_nested_calls_run_inline():
    threads = set()

    def work(i):
        threads.add(threading.current_thread().name)
        return on_torch_thread(lambda: i * 2)  # nested: would deadlock if it were queued

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda i: on_torch_thread(work, i), range(20))) == [i * 2 for i in range(20)]
    assert len(threads) == 1 and threads.pop().startswith("loupe-torch")
    assert threading.current_thread().name not in threads


def test_exceptions_reach_the_caller():
    def fail():
        raise ValueError("bad model")

    with pytest.raises(ValueError, match="bad model"):
        on_torch_thread(fail)


class ThreadRecorder(Captioning):
    """A captioner stand-in noting which thread prepares and generates."""

    model_id = "stub"

    def __init__(self, device):
        self.device = torch.device(device) if device else None
        self.prepared, self.generated = set(), set()

    def prepare(self, images):
        self.prepared.add(threading.current_thread().name)
        return [im.size for im in images]

    def generate(self, sizes):
        self.generated.add(threading.current_thread().name)
        return [f"{w}x{h}" for w, h in sizes]


@pytest.mark.parametrize(("device", "prepares_on_torch_thread"), [("cpu", True), ("cuda", False)])
def test_two_shards_share_the_torch_thread(tmp_path, device, prepares_on_torch_thread):
    for i in range(8):
        Image.new("RGB", (40 + i, 30), "green").save(tmp_path / f"img-{i}.png")
    config = JobConfig(input=str(tmp_path), output=str(tmp_path / "out"), model="stub", batch_size=2, tasks="caption")
    captioner = ThreadRecorder(device)
    processor = ShardProcessor(config, captioner=captioner)
    shards = [Shard(n, ShardKind.FILES, tuple(str(tmp_path / f"img-{i}.png") for i in range(n * 4, n * 4 + 4))) for n in (0, 1)]
    with ThreadPoolExecutor(2) as pool:  # as a replica runs two shards at once
        stats = list(pool.map(processor.process, shards))
    assert [s.rows_ok for s in stats] == [4, 4]
    assert len(captioner.generated) == 1 and next(iter(captioner.generated)).startswith("loupe-torch")
    # A CPU model keeps every core busy: preprocessing waits its turn on the same thread; beside
    # a GPU model it runs on each shard's producer thread, overlapping generation.
    assert (captioner.prepared == captioner.generated) is prepares_on_torch_thread
    if not prepares_on_torch_thread:
        assert all(name.startswith("loupe-shard") for name in captioner.prepared)
