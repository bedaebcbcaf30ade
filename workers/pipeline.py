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

import hashlib
import itertools
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from PIL import Image

from loupe.schemas.codes import ErrorCode
from loupe.schemas.config import JobConfig
from loupe.schemas.records import ShardStats
from loupe.schemas.plan import Shard
from loupe.schemas.rows import RowStatus, output_schema
from loupe.workers.models.captioner import Captioner
from loupe.workers.decode import DecodeError, decode_sized, needed_side
from loupe.workers.reader import Sample, read_shard
from loupe.workers.storage import open_storage
from loupe.workers.torch_thread import on_torch_thread
from loupe.workers.writer import write_part, write_stats
from loupe.schemas.errors import one_line

T = TypeVar("T")

# Batches prepared ahead of the model: one generating, one ready, one being prepared.
_PREFETCH_BATCHES = 2
# Decoded images are grouped this many batches at a time by their prompt's length, so that a
# batch pads little (anyres models give each aspect ratio and size its own image token count).
BUCKET_BATCHES = 4


@dataclass
class _Item:
    """One image on its way through a shard; `seq` keeps rows in source order."""

    seq: int
    sample: Sample
    image: Image.Image | None = None
    size: tuple[int, int] | None = None  # the full image's (width, height), whatever scale it was decoded at
    error: tuple[ErrorCode, str] | None = None


@dataclass
class _Batch:
    """Images prepared for the models; an input left None failed to prepare."""

    items: list[_Item]
    caption_inputs: Any = None
    moderation_inputs: Any = None
    embedding_inputs: Any = None
    error: Exception | None = None  # preparing the batch raised this


@dataclass
class _Result:
    """What the models said of one image."""

    item: _Item
    caption: str | None
    scores: dict[str, float] | None
    image_embedding: Any = None  # np.ndarray (dim,) float32, L2-normalized
    caption_embedding: Any = None


class _Timings:
    """Seconds spent per stage, summed over a shard; shared by the producer and consumer."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds: Counter[str] = Counter()

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
        captioner: Any = None,
        moderator: Any = None,
        image_embedder: Any = None,
        text_embedder: Any = None,
        decode_threads: int | None = None,
    ) -> None:
        """Load the models the job's tasks need; tests and remote judges pass their own."""
        self.config = config
        captioner, moderator, image_embedder, text_embedder = on_torch_thread(
            _load_models, config, device, captioner, moderator, image_embedder, text_embedder
        )
        self.captioner = captioner if config.captions else None
        self.moderator = moderator if config.moderates else None
        self.image_embedder = image_embedder if config.embeds else None
        self.text_embedder = text_embedder if config.embeds else None
        self.schema = output_schema(
            config.taxonomy,
            self.image_embedder.dim if self.image_embedder else None,
            self.text_embedder.dim if self.text_embedder else None,
        )
        self._taxonomy_sha256 = config.taxonomy.content_hash()
        # A moderator sharing the captioner's weights and prompt prefix reads the image's keys and
        # values from the caption's KV cache: no second encoding, no moderation inputs to prepare.
        reads_prefix_of = getattr(self.moderator, "reads_prefix_of", None)
        self._moderation_reads_cache = bool(reads_prefix_of and reads_prefix_of(self.captioner))
        # JPEGs are decoded at the smallest scale that leaves the models' inputs unchanged.
        self.decode_side = models_decode_side(self.captioner, self.moderator, self.image_embedder)
        # The models run on the process's torch thread (see torch_thread), one batch at a time.
        # Models on the CPU already use every core with one OpenMP team: preprocessing (torch
        # operators) from another thread would start a second team, so there it takes its turn on
        # the torch thread between batches instead of overlapping them.
        self._take_turns = _on_cpu(self.captioner, self.moderator, self.image_embedder, self.text_embedder)
        self._decode_pool = ThreadPoolExecutor(
            max_workers=decode_threads or min(8, (os.cpu_count() or 2)),
            thread_name_prefix="loupe-decode",
        )
        self._input = open_storage(config.input, config.endpoint_url)
        self._output = open_storage(config.output, config.endpoint_url)

    def process(self, shard: Shard, *, attempt: int = 1, node_id: str = "") -> ShardStats:
        """Caption every image of the shard, write its part, then its stats record."""
        started = time.time()
        timings = _Timings()
        batches: queue.Queue[Any] = queue.Queue(maxsize=_PREFETCH_BATCHES)
        errors: list[_Item] = []
        producer = threading.Thread(
            target=self._produce,
            args=(shard, batches, errors, timings),
            name=f"loupe-shard-{shard.name}",
            daemon=True,
        )
        producer.start()
        results: list[_Result] = []
        try:
            while True:
                message = batches.get()
                if message is _DONE:
                    break
                if isinstance(message, _Failed):
                    raise message.exc
                results.extend(self._infer(message, errors, timings))
        finally:
            producer.join()

        ok_rows = [(r.item.seq, self._ok_row(shard, r)) for r in results]
        rows = sorted(ok_rows + [(item.seq, self._error_row(shard, item)) for item in errors], key=lambda p: p[0])
        t0 = time.perf_counter()
        part = write_part(self._output, self.config.output, shard.shard_id, [row for _, row in rows], self.schema)
        timings.add("write", time.perf_counter() - t0)
        finished = time.time()
        codes = Counter(item.error[0].value for item in errors if item.error)
        flagged = Counter(key for _, row in ok_rows for key in row.get("flagged_categories") or ())
        stats = ShardStats(
            shard_id=shard.shard_id,
            part=part.path,
            part_sha256=part.sha256,
            part_bytes=part.bytes,
            rows=len(rows),
            rows_ok=len(results),
            rows_error=len(errors),
            error_codes=dict(sorted(codes.items())),
            seconds=round(finished - started, 4),
            started_at=started,
            finished_at=finished,
            node_id=node_id,
            attempt=attempt,
            timings={stage: round(value, 4) for stage, value in sorted(timings.seconds.items())},
            rows_flagged=sum(bool(row.get("flagged")) for _, row in ok_rows),
            flagged={key: flagged[key] for key in self.config.taxonomy.keys if flagged[key]},
        )
        write_stats(self._output, self.config.output, stats)
        return stats

    # -- one batch of decoded images, for benchmarks ---------------------------------------

    def prepare_images(self, images: list[Image.Image]) -> _Batch:
        """Decoded images prepared for the models as the producer prepares a batch (on the torch thread on a CPU)."""
        items = [_Item(i, None, image, image.size) for i, image in enumerate(images)]  # type: ignore[arg-type]
        return self._in_turn(self._prepare, items, _Timings())

    def run_batch(self, batch: _Batch) -> tuple[list[str | None], Counter[str]]:
        """The models on a prepared batch, exactly as a shard runs them: captions and seconds per stage."""
        timings = _Timings()
        results = self._run_models(batch, timings)
        return [result.caption for result in results], timings.seconds

    # -- producer thread: fetch, decode, preprocess -------------------------------------

    def _produce(
        self, shard: Shard, batches: queue.Queue, errors: list[_Item], timings: _Timings
    ) -> None:
        try:
            for window in _chunked(self._fetched(shard, timings), BUCKET_BATCHES * self.config.batch_size):
                for items in self._decode_window(window, errors):
                    # Prepared one batch at a time, so at most the queue's batches wait in (pinned) memory.
                    batches.put(self._in_turn(self._prepare, items, timings))
            batches.put(_DONE)
        except BaseException as exc:  # handed to the consumer, which fails the shard
            batches.put(_Failed(exc))

    def _in_turn(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on the torch thread between the models' batches on a CPU replica; here and now on a GPU one."""
        return on_torch_thread(fn, *args) if self._take_turns else fn(*args)

    def _decode_window(self, window: list[Future[_Item]], errors: list[_Item]) -> list[list[_Item]]:
        """The window's images, decoded on the pool as they arrived: failures set aside, the rest bucketed."""
        ready = []
        for item in (future.result() for future in window):
            (errors if item.error is not None else ready).append(item)
        return self._bucketed(ready)

    def _fetched(self, shard: Shard, timings: _Timings) -> Iterator[Future[_Item]]:
        """The shard's samples in source order, each handed to the decode pool as it arrives."""
        samples = read_shard(shard, self._input, image_column=self.config.image_column)
        for seq in itertools.count():
            t0 = time.perf_counter()
            sample = next(samples, None)
            timings.add("fetch", time.perf_counter() - t0)
            if sample is None:
                return
            yield self._decode_pool.submit(self._decode, _Item(seq, sample), timings)

    def _decode(self, item: _Item, timings: _Timings) -> _Item:
        if item.sample.error is not None:
            item.error = item.sample.error
            return item
        t0 = time.perf_counter()
        try:
            item.image, item.size = decode_sized(item.sample.data or b"", min_side=self.decode_side)
        except DecodeError as exc:
            item.error = (exc.code, exc.message)
        timings.add("decode", time.perf_counter() - t0)
        return item

    def _bucketed(self, items: list[_Item]) -> list[list[_Item]]:
        return bucketed(items, [item.image.size for item in items], self.config.batch_size, self.captioner)

    def _prepare(self, items: list[_Item], timings: _Timings) -> _Batch:
        images = [item.image for item in items]
        batch = _Batch(items)
        t0 = time.perf_counter()
        try:
            if self.captioner is not None:
                batch.caption_inputs = self.captioner.prepare(images)
            if self.moderator is not None and not self._moderation_reads_cache:
                batch.moderation_inputs = self.moderator.prepare(images)
            if self.image_embedder is not None:
                batch.embedding_inputs = self.image_embedder.prepare(images)
        except Exception as exc:
            batch.error = exc  # the consumer retries image by image to find the culprit
        timings.add("preprocess", time.perf_counter() - t0)
        return batch

    # -- consumer: the models --------------------------------------------------------------

    def _run_models(self, batch: _Batch, timings: _Timings) -> list[_Result]:
        return on_torch_thread(self._run_models_here, batch, timings)

    def _run_models_here(self, batch: _Batch, timings: _Timings) -> list[_Result]:
        results = [_Result(item, None, None) for item in batch.items]
        encoded = None
        if self.captioner is not None:
            t0 = time.perf_counter()
            if self._moderation_reads_cache:
                captions, encoded = self.captioner.generate_encoded(batch.caption_inputs)
            else:
                captions = self.captioner.generate(batch.caption_inputs)
            for result, caption in zip(results, captions, strict=True):
                result.caption = caption
            timings.add("generate", time.perf_counter() - t0)
        if self.moderator is not None:
            t0 = time.perf_counter()
            if self._moderation_reads_cache:
                scores = self.moderator.score_encoded(encoded)
            else:
                scores = self.moderator.score(batch.moderation_inputs)
            for result, scores in zip(results, scores, strict=True):
                result.scores = scores
            timings.add("moderate", time.perf_counter() - t0)
        if self.image_embedder is not None:
            t0 = time.perf_counter()
            for result, vector in zip(results, self.image_embedder.embed(batch.embedding_inputs), strict=True):
                result.image_embedding = vector
            self._embed_texts(results)
            timings.add("embed", time.perf_counter() - t0)
        return results

    def _embed_texts(self, results: list[_Result]) -> None:
        """Caption embeddings: of the source's own text if --text-column names one, else of the caption."""
        if self.text_embedder is None:
            return
        column = self.config.text_column
        texts = [r.item.sample.metadata.get(column) if column else r.caption for r in results]
        present = [(r, t) for r, t in zip(results, texts) if t and t.strip()]
        if present:
            vectors = self.text_embedder.embed_texts([t for _, t in present])
            for (result, _), vector in zip(present, vectors, strict=True):
                result.caption_embedding = vector

    def _infer(self, batch: _Batch, errors: list[_Item], timings: _Timings) -> list[_Result]:
        if batch.error is None:
            try:
                return self._run_models(batch, timings)
            except Exception:
                if len(batch.items) == 1:
                    raise
        return self._one_by_one(batch.items, errors, timings)

    def _one_by_one(self, items: list[_Item], errors: list[_Item], timings: _Timings) -> list[_Result]:
        """Isolate the images a batch failed on; if every one fails, the model is at fault."""
        done: list[_Result] = []
        failed: list[_Item] = []
        last: Exception | None = None
        for item in items:
            try:
                prepared = self._in_turn(self._prepare, [item], timings)
                if prepared.error is not None:
                    raise prepared.error
                done += self._run_models(prepared, timings)
            except Exception as exc:
                last = exc
                item.error = (ErrorCode.MODEL_FAILED, one_line(exc, 500))
                failed.append(item)
        if failed and not done:
            raise RuntimeError(f"the model failed on every image of a batch: {one_line(last, 500)}") from last
        errors.extend(failed)
        return done

    # -- rows ---------------------------------------------------------------------------

    def _base_row(self, shard: Shard, item: _Item) -> dict[str, Any]:
        data = item.sample.data
        return {
            "image_id": item.sample.image_id,
            "source_uri": item.sample.source_uri,
            "shard_id": shard.shard_id,
            "size_bytes": len(data) if data is not None else None,
            "sha256": hashlib.sha256(data).hexdigest() if data is not None else None,
            "model": self.config.model,
            "prompt": self.config.prompt,
            "source_metadata": list(item.sample.metadata.items()) or None,
        }

    def _ok_row(self, shard: Shard, result: _Result) -> dict[str, Any]:
        item = result.item
        assert item.size is not None
        row = self._base_row(shard, item) | {
            "status": RowStatus.OK.value,
            "width": item.size[0],
            "height": item.size[1],
            "caption": result.caption,
            "image_embedding": result.image_embedding,
            "caption_embedding": result.caption_embedding,
        }
        if result.scores is not None:
            over = [c.key for c in self.config.taxonomy.categories if result.scores[c.key] >= c.threshold]
            row |= {
                "moderation": result.scores,
                "flagged": bool(over),
                "flagged_categories": over,
                "moderation_model": self.config.judge,
                "taxonomy_sha256": self._taxonomy_sha256,
            }
        return row

    def _error_row(self, shard: Shard, item: _Item) -> dict[str, Any]:
        assert item.error is not None
        code, message = item.error
        return self._base_row(shard, item) | {
            "status": RowStatus.ERROR.value,
            "error_code": code.value,
            "error_message": message,
        }


def _load_models(
    config: JobConfig, device: str | None, captioner: Any, moderator: Any, image_embedder: Any, text_embedder: Any
) -> tuple[Any, Any, Any, Any]:
    """The models the job's tasks need, those not passed in loaded here (on the torch thread)."""
    if config.captions and captioner is None:
        captioner = Captioner(
            config.model,
            prompt=config.prompt,
            max_new_tokens=config.max_new_tokens,
            min_new_tokens=config.min_new_tokens,
            device=device,
        )
    if config.moderates and moderator is None:
        from loupe.workers.models.moderator import Moderator

        moderator = Moderator(config.judge, config.taxonomy, device=device, share=captioner)
    if config.embeds:
        from loupe.workers.models.embedder import ImageEmbedder, TextEmbedder, resolve_text_model

        image_embedder = image_embedder or ImageEmbedder(config.image_embedding_model, device=device)
        if text_embedder is None and (config.captions or config.text_column):
            text_embedder = TextEmbedder(resolve_text_model(config.text_embedding_model), device=device)
    return captioner, moderator, image_embedder, text_embedder


def bucketed(items: list[T], sizes: list[tuple[int, int]], batch_size: int, captioner: Any) -> list[list[T]]:
    """Batches of the items (images of these sizes), those whose prompts are about as long together.

    The captioner counts each image's prompt tokens from its size; equal lengths keep their
    order, and with no captioner, or one that cannot count, the order is kept.
    """
    image_tokens = getattr(captioner, "image_tokens", None)
    if image_tokens is not None and len(items) > batch_size:
        lengths = image_tokens(sizes)
        if lengths is not None:
            items = [item for _, item in sorted(zip(lengths, items, strict=True), key=lambda pair: pair[0])]
    return [items[i : i + batch_size] for i in range(0, len(items), batch_size)]


def _chunked(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    while chunk := list(itertools.islice(items, size)):
        yield chunk


def _on_cpu(*models: Any) -> bool:
    """Whether any of the models runs on the CPU (a test's stand-in without a device does not)."""
    return any(getattr(getattr(model, "device", None), "type", None) == "cpu" for model in models)


def models_decode_side(*models: Any) -> int | None:
    """The side images can be decoded down to for every model that reads them; None: decode in full."""
    sides = []
    for model in models:
        if model is None:
            continue
        processor = getattr(getattr(model, "processor", None), "image_processor", None)
        side = needed_side(processor) if processor is not None else None
        if side is None:
            return None
        sides.append(side)
    return max(sides, default=None)
