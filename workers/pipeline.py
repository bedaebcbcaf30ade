"""The per-shard pipeline: read, decode, caption, write the part, then mark the shard done.

Plain Python with no Ray import: a unit test runs it in-process, a Ray actor wraps it. A
producer thread fetches the shard's images (concurrently, see reader), has them decoded on a
small thread pool (JPEGs at the smallest scale the models' inputs allow), groups them a few
batches at a time by prompt length and prepares the batches; a bounded queue hands them to the
models, which run on the process's single torch thread (see torch_thread). Decoding (Pillow,
no OpenMP) always overlaps the models. Preprocessing runs torch operators: on a GPU replica it
overlaps generation on the producer thread; on a CPU replica, whose model keeps every core busy
with its OpenMP team, it takes its turn on the torch thread between batches.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from typing import Any, TypeVar

from loupe.schemas.codes import ErrorCode
from loupe.schemas.config import JobConfig
from loupe.schemas.errors import one_line
from loupe.schemas.plan import Shard
from loupe.schemas.records import ShardStats
from loupe.schemas.rows import output_schema
from loupe.workers.batching import BUCKET_BATCHES, bucketed, chunked
from loupe.workers.decode import DecodeError, decode_sized
from loupe.workers.faults import fault_point
from loupe.workers.hashing import HASH_DECODE_SIDE, KnownContent, pdq
from loupe.workers.models.devices import device_lost, out_of_memory
from loupe.workers.models.job_models import load_job_models, models_decode_side, on_cpu
from loupe.workers.models.stages import (
    Captioning,
    ImageEmbedding,
    Moderating,
    TextEmbedding,
)
from loupe.workers.reader import read_shard
from loupe.workers.retry import merge_retried
from loupe.workers.rows import Item, Result, RowBuilder
from loupe.workers.storage import TransientError, open_storage
from loupe.workers.torch_thread import on_torch_thread
from loupe.workers.writer import write_part, write_stats
from PIL import Image

T = TypeVar("T")

# Batches prepared ahead of the model: one generating, one ready, one being prepared.
_PREFETCH_BATCHES = 2
# How often a producer waiting on a full queue looks whether the consumer has left.
_POLL_SECONDS = 0.1


@dataclass
class _Batch:
    """Images prepared for the models; an input left None failed to prepare."""

    items: list[Item]
    caption_inputs: Any = None
    moderation_inputs: Any = None
    embedding_inputs: Any = None
    error: Exception | None = None  # preparing the batch raised this


class _Timings:
    """Seconds spent per stage, summed over a shard; shared by the producer and consumer."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds: Counter[str] = Counter()
        self.oom_splits = 0  # batches split in two after running out of GPU memory (consumer only)

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] += seconds


_DONE = object()


@dataclass
class _Failed:
    exc: BaseException


class ShardProcessor:
    """Runs whole shards through one captioner; thread-safe so a replica can overlap two shards."""

    def __init__(
        self,
        config: JobConfig,
        *,
        device: str | None = None,
        captioner: Captioning | None = None,
        moderator: Moderating | None = None,
        image_embedder: ImageEmbedding | None = None,
        text_embedder: TextEmbedding | None = None,
        decode_threads: int | None = None,
        gpus: list[int] | None = None,
    ) -> None:
        """Load the models the job's tasks need (over `gpus`, the GPUs torch numbers, where several); tests and remote judges pass their own."""
        self.config = config
        captioner, moderator, image_embedder, text_embedder = on_torch_thread(
            load_job_models, config, device, captioner, moderator, image_embedder, text_embedder, gpus
        )
        self.captioner = captioner if config.captions else None
        self.moderator = moderator if config.moderates else None
        self.image_embedder = image_embedder if config.embeds else None
        self.text_embedder = text_embedder if config.embeds else None
        self.schema = output_schema(
            config.taxonomy,
            self.image_embedder.dim if self.image_embedder else None,
            self.text_embedder.dim if self.text_embedder else None,
            config.text_column,
        )
        self._rows = RowBuilder(config)
        # A moderator sharing the captioner's weights and prompt prefix reads the image's keys and
        # values from the caption's KV cache: no second encoding, no moderation inputs to prepare.
        self.moderation_reads_cache = self.moderator is not None and self.moderator.reads_prefix_of(self.captioner)
        # JPEGs are decoded at the smallest scale that leaves the models' inputs unchanged.
        self.decode_side = models_decode_side(self.captioner, self.moderator, self.image_embedder)
        if config.hashes and self.decode_side is not None:
            # PDQ needs more: at CLIP's 224 a hash drifts up to 14 of its 31 bits from the full image's.
            self.decode_side = max(self.decode_side, HASH_DECODE_SIDE)
        # The models run on the process's torch thread (see torch_thread), one batch at a time.
        # Models on the CPU already use every core with one OpenMP team: preprocessing (torch
        # operators) from another thread would start a second team, so there it takes its turn on
        # the torch thread between batches instead of overlapping them.
        self._take_turns = on_cpu(self.captioner, self.moderator, self.image_embedder, self.text_embedder)
        self._decode_pool = ThreadPoolExecutor(
            max_workers=decode_threads or min(8, (os.cpu_count() or 2)),
            thread_name_prefix="loupe-decode",
        )
        self._input = open_storage(config.input, config.endpoint_url)
        # Loaded once per replica; the sha256 check refuses a list edited since the job started.
        self._known = (
            KnownContent.load(config.match_list, config.endpoint_url, config.match_list_sha256)
            if config.match_list
            else None
        )
        self._output = open_storage(config.output, config.endpoint_url)
        # Halved for the rest of the job whenever a batch runs out of GPU memory.
        self.batch_size = config.batch_size

    def process(
        self,
        shard: Shard,
        *,
        attempt: int = 1,
        node_id: str = "",
        redo: frozenset[str] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> ShardStats:
        """Caption every image of the shard, write its part, then its stats record.

        `progress(n)`, if given, is called after each batch with the n images the models just did.

        With `redo` (image ids), only those images are processed again and their rows replace the
        same ids' rows in the shard's existing part (`loupe run --retry-errors`).
        """
        started = time.time()
        timings = _Timings()
        batches: queue.Queue[Any] = queue.Queue(maxsize=_PREFETCH_BATCHES)
        stop = threading.Event()
        errors: list[Item] = []
        producer = threading.Thread(
            target=self._produce,
            args=(shard, batches, stop, errors, timings, redo),
            name=f"loupe-shard-{shard.name}",
            daemon=True,
        )
        producer.start()
        results: list[Result] = []
        try:
            while (message := batches.get()) is not _DONE:
                if isinstance(message, _Failed):
                    raise message.exc
                results.extend(self._infer(message, errors, timings))
                if progress is not None:
                    progress(len(message.items))
        finally:
            # Leaving early (the model failed on a whole batch), the consumer tells the producer,
            # which would otherwise wait forever on the full queue, and this join with it.
            stop.set()
            producer.join()

        shard_rows = self._rows.shard_rows(shard, results, errors)
        if redo is not None:
            shard_rows = merge_retried(self._output, self.config.output, shard.shard_id, shard_rows, self.config.taxonomy)
        t0 = time.perf_counter()
        part = write_part(self._output, self.config.output, shard.shard_id, shard_rows.rows, self.schema)
        timings.add("write", time.perf_counter() - t0)
        finished = time.time()
        stats = ShardStats(
            shard_id=shard.shard_id,
            part=part.path,
            part_sha256=part.sha256,
            part_bytes=part.bytes,
            rows=len(shard_rows.rows),
            rows_ok=shard_rows.rows_ok,
            rows_error=shard_rows.rows_error,
            error_codes=shard_rows.error_codes,
            seconds=round(finished - started, 4),
            started_at=started,
            finished_at=finished,
            node_id=node_id,
            attempt=attempt,
            timings={stage: round(value, 4) for stage, value in sorted(timings.seconds.items())},
            rows_flagged=shard_rows.rows_flagged,
            flagged=shard_rows.flagged,
            decode_side=self.decode_side,
            oom_splits=timings.oom_splits,
            batch_size=self.batch_size,
            rows_known_content=shard_rows.rows_known_content,
        )
        write_stats(self._output, self.config.output, stats)
        return stats

    # -- one batch of decoded images, for benchmarks ---------------------------------------

    def prepare_images(self, images: list[Image.Image]) -> _Batch:
        """Decoded images prepared for the models as the producer prepares a batch (on the torch thread on a CPU)."""
        items = [Item(i, None, image, image.size) for i, image in enumerate(images)]  # type: ignore[arg-type]
        return self._in_turn(self._prepare, items, _Timings())

    def run_batch(self, batch: _Batch) -> tuple[list[str | None], Counter[str]]:
        """The models on a prepared batch, exactly as a shard runs them: captions and seconds per stage."""
        timings = _Timings()
        results = self._run_models(batch, timings)
        return [result.caption for result in results], timings.seconds

    # -- producer thread: fetch, decode, preprocess -------------------------------------

    def _produce(
        self,
        shard: Shard,
        batches: queue.Queue,
        stop: threading.Event,
        errors: list[Item],
        timings: _Timings,
        redo: frozenset[str] | None = None,
    ) -> None:
        """Hand the shard's prepared batches to the consumer, then _DONE (or _Failed); stop once it has left."""
        try:
            with closing(self._fetched(shard, timings, redo)) as fetched:
                for window in chunked(fetched, BUCKET_BATCHES * self.batch_size):
                    for items in self._decode_window(window, errors):
                        if stop.is_set():
                            return
                        # Prepared one batch at a time, so at most the queue's batches wait in (pinned) memory.
                        if not _hand_over(batches, stop, self._in_turn(self._prepare, items, timings)):
                            return
            message: Any = _DONE
        except BaseException as exc:  # handed to the consumer, which fails the shard
            message = _Failed(exc)
        _hand_over(batches, stop, message)

    def _in_turn(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on the torch thread between the models' batches on a CPU replica; here and now on a GPU one."""
        return on_torch_thread(fn, *args) if self._take_turns else fn(*args)

    def _decode_window(self, window: list[Future[Item]], errors: list[Item]) -> list[list[Item]]:
        """The window's images, decoded on the pool as they arrived: failures set aside, the rest bucketed."""
        ready = []
        for item in (future.result() for future in window):
            (errors if item.error is not None else ready).append(item)
        if self._known is not None:  # one FAISS range search per window, on this (producer) thread
            for item, labels in zip(ready, self._known.match([item.pdq for item in ready]), strict=True):
                item.matched_labels = labels
        return bucketed(ready, [item.image.size for item in ready], self.batch_size, self.captioner)

    def _fetched(self, shard: Shard, timings: _Timings, redo: frozenset[str] | None = None) -> Iterator[Future[Item]]:
        """The shard's samples in source order (only `redo`'s when given), each handed to the decode pool as it arrives."""
        with closing(read_shard(shard, self._input, image_column=self.config.image_column)) as samples:
            for seq in itertools.count():
                t0 = time.perf_counter()
                sample = next(samples, None)
                timings.add("fetch", time.perf_counter() - t0)
                if sample is None:
                    return
                if redo is not None and sample.image_id not in redo:
                    continue
                yield self._decode_pool.submit(self._decode, Item(seq, sample), timings)

    def _decode(self, item: Item, timings: _Timings) -> Item:
        if item.sample.error is not None:
            item.error = item.sample.error
            return item
        try:
            fault_point("read", [item.sample.source_uri])
        except TransientError as exc:
            item.error = (ErrorCode.READ_FAILED, one_line(exc))
            return item
        t0 = time.perf_counter()
        try:
            item.image, item.size = decode_sized(item.sample.data or b"", min_side=self.decode_side)
        except DecodeError as exc:
            item.error = (exc.code, exc.message)
        timings.add("decode", time.perf_counter() - t0)
        if self.config.hashes and item.image is not None:
            # Here on the decode pool, overlapping the models like decoding (see docs/benchmarks.md).
            t0 = time.perf_counter()
            item.pdq = pdq(item.image)
            timings.add("hash", time.perf_counter() - t0)
        return item

    def _prepare(self, items: list[Item], timings: _Timings) -> _Batch:
        images = [item.image for item in items]
        batch = _Batch(items)
        t0 = time.perf_counter()
        try:
            if self.captioner is not None:
                batch.caption_inputs = self.captioner.prepare(images)
            if self.moderator is not None and not self.moderation_reads_cache:
                batch.moderation_inputs = self.moderator.prepare(images)
            if self.image_embedder is not None:
                batch.embedding_inputs = self.image_embedder.prepare(images)
        except Exception as exc:
            batch.error = exc  # the consumer retries image by image to find the culprit
        timings.add("preprocess", time.perf_counter() - t0)
        return batch

    # -- consumer: the models --------------------------------------------------------------

    def _run_models(self, batch: _Batch, timings: _Timings) -> list[Result]:
        return on_torch_thread(self._run_models_here, batch, timings)

    def _run_models_here(self, batch: _Batch, timings: _Timings) -> list[Result]:
        results = [Result(item) for item in batch.items]
        # A generator: built only where a fault plan is set; benchmark batches have no source.
        fault_point("model", (item.sample.source_uri for item in batch.items if item.sample is not None))
        encoded = None
        if self.captioner is not None:
            t0 = time.perf_counter()
            if self.moderation_reads_cache:
                captions, encoded = self.captioner.generate_encoded(batch.caption_inputs)
            else:
                captions = self.captioner.generate(batch.caption_inputs)
            for result, caption in zip(results, captions, strict=True):
                result.caption = caption
            timings.add("generate", time.perf_counter() - t0)
        if self.moderator is not None:
            t0 = time.perf_counter()
            if self.moderation_reads_cache:
                batch_scores = self.moderator.score_encoded(encoded)
            else:
                batch_scores = self.moderator.score(batch.moderation_inputs)
            for result, scores in zip(results, batch_scores, strict=True):
                result.scores = scores
            timings.add("moderate", time.perf_counter() - t0)
        if self.image_embedder is not None:
            t0 = time.perf_counter()
            for result, vector in zip(results, self.image_embedder.embed(batch.embedding_inputs), strict=True):
                result.image_embedding = vector
            self._embed_texts(results)
            timings.add("embed", time.perf_counter() - t0)
        return results

    def _embed_texts(self, results: list[Result]) -> None:
        """Text embeddings: of the source's own text if --text-column names one, else of the caption."""
        if self.text_embedder is None:
            return
        column = self.config.text_column
        texts = [r.item.sample.metadata.get(column) if column else r.caption for r in results]
        present = [(r, t) for r, t in zip(results, texts) if t and t.strip()]
        if present:
            vectors = self.text_embedder.embed_texts([t for _, t in present])
            for (result, _), vector in zip(present, vectors, strict=True):
                result.text_embedding = vector

    def _infer(self, batch: _Batch, errors: list[Item], timings: _Timings) -> list[Result]:
        if batch.error is None:
            try:
                return self._run_models(batch, timings)
            except Exception as exc:
                if device_lost(exc):
                    raise  # the CUDA context is unusable: the replica ends, the shard goes elsewhere
                if out_of_memory(exc) and len(batch.items) > 1:
                    return self._halves(batch.items, errors, timings)
                if len(batch.items) == 1:
                    raise
        return self._one_by_one(batch.items, errors, timings)

    def _halves(self, items: list[Item], errors: list[Item], timings: _Timings) -> list[Result]:
        """A batch that ran out of GPU memory, again in two halves; later batches are no larger than a half."""
        half = (len(items) + 1) // 2
        self.batch_size = min(self.batch_size, half)
        timings.oom_splits += 1
        results: list[Result] = []
        for part in (items[:half], items[half:]):
            results += self._infer(self._in_turn(self._prepare, part, timings), errors, timings)
        return results

    def _one_by_one(self, items: list[Item], errors: list[Item], timings: _Timings) -> list[Result]:
        """Isolate the images a batch failed on; if every one fails, the model is at fault."""
        done: list[Result] = []
        failed: list[Item] = []
        last: Exception | None = None
        for item in items:
            try:
                prepared = self._in_turn(self._prepare, [item], timings)
                if prepared.error is not None:
                    raise prepared.error
                done += self._run_models(prepared, timings)
            except Exception as exc:
                if device_lost(exc):
                    raise
                last = exc
                item.error = (ErrorCode.MODEL_FAILED, one_line(exc, 500))
                failed.append(item)
        if failed and not done:
            raise RuntimeError(f"the model failed on every image of a batch: {one_line(last, 500)}") from last
        errors.extend(failed)
        return done


def _hand_over(batches: queue.Queue, stop: threading.Event, message: Any) -> bool:
    """Put `message` on the queue as soon as there is room; False, dropping it, once `stop` is set."""
    while not stop.is_set():
        try:
            batches.put(message, timeout=_POLL_SECONDS)
            return True
        except queue.Full:
            continue
    return False
