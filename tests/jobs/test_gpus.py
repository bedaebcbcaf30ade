"""GPU planning: how many GPUs a replica needs, by hand-computed figures; sizes refused before anything waits."""

import pytest

from loupe.jobs.gpus import check_gpus_per_replica, node_gpu_memory, plan_gpus, size_replica_gpus
from loupe.schemas.config import JobConfig, load_config
from loupe.schemas.errors import UserError
from loupe.workers.models.devices import batch_memory, image_tokens
from loupe.workers.models.random import random_model_config

GB = 10**9
# The public checkpoints' parameters, counted on the meta device (tests/workers/models/test_random.py
# checks these counts against the published ones).
PARAMETERS = {"13b": 13_351_494_656, "34b": 34_752_083_968, "72b": 73_181_570_592}
FAMILY = {"13b": "llava", "34b": "llava-next", "72b": "llava-onevision"}
# Batch 8, a 48-token prompt, 64 new tokens, bfloat16.
SETTINGS = {"batch_size": 8, "prompt_tokens": 48, "max_new_tokens": 64}


@pytest.fixture(scope="module")
def configs():
    return {size: random_model_config(FAMILY[size], size) for size in FAMILY}


def test_image_tokens_per_family(configs):
    # LLaVA-1.5: 24 x 24 patches of 14 px at 336 px.
    assert image_tokens(configs["13b"]) == 576
    # LLaVA-NeXT: the base image + a 2x2 grid of 576-token tiles, and a newline per feature row (2 x 24 + 1).
    assert image_tokens(configs["34b"]) == 576 * 5 + 49
    # OneVision: 27 x 27 = 729 per 384-px tile, base + at most 9 tiles (anyres_max_9), 3 x 27 + 1 newlines.
    assert image_tokens(configs["72b"]) == 729 * 10 + 82


@pytest.mark.parametrize(
    ("size", "tokens", "kv_per_token", "layer_width", "gpus_80", "gpus_24"),
    [
        # Llama-2-13B: 40 layers x 40 KV heads x 128; 13824 MLP, 5120 hidden.
        ("13b", 48 + 576 + 64, 2 * 40 * 40 * 128 * 2, 2 * 13824 + 4 * 5120, 1, 2),
        # Yi-34B: 60 layers x 8 KV heads x 128; 20480 MLP, 7168 hidden.
        ("34b", 48 + 2929 + 64, 2 * 60 * 8 * 128 * 2, 2 * 20480 + 4 * 7168, 2, 5),
        # Qwen2-72B: 80 layers x 8 KV heads x 128; 29568 MLP, 8192 hidden.
        ("72b", 48 + 7372 + 64, 2 * 80 * 8 * 128 * 2, 2 * 29568 + 4 * 8192, 3, None),
    ],
)
def test_gpus_per_replica_from_the_checkpoint_by_hand(configs, size, tokens, kv_per_token, layer_width, gpus_80, gpus_24):
    memory = batch_memory(configs[size], PARAMETERS[size], **SETTINGS)
    weights = PARAMETERS[size] * 2
    kv = kv_per_token * tokens * 8
    activations = 8 * (tokens - 64) * layer_width * 2
    assert (memory.tokens, memory.kv_bytes_per_token) == (tokens, kv_per_token)
    assert (memory.weight_bytes, memory.kv_bytes, memory.activation_bytes) == (weights, kv, activations)
    # Weights and KV cache over n GPUs, each keeping 90% of its memory less one layer's activations.
    by_hand_80 = -(-(weights + kv) // int(80 * GB * 0.9 - activations))
    assert by_hand_80 == gpus_80
    plan = plan_gpus(memory, gpu_bytes=80 * GB, node_gpus=8)
    assert plan.gpus == gpus_80 and f"{gpus_80} GPU(s) per replica" in plan.reason
    assert f"{weights / GB:.1f} GB of weights" in plan.reason
    by_hand_24 = -(-(weights + kv) // int(24 * GB * 0.9 - activations))
    if gpus_24 is None:  # 166 GB over 24 GB GPUs with 10.7 GB left each beside the activations: 16, no node has them
        assert by_hand_24 == 16
        with pytest.raises(UserError, match="fits no node"):
            plan_gpus(memory, gpu_bytes=24 * GB, node_gpus=8)
    else:
        assert by_hand_24 == gpus_24 == plan_gpus(memory, gpu_bytes=24 * GB, node_gpus=8).gpus


def test_the_72b_shape_fits_no_node_of_two_gpus_said_with_the_numbers(configs):
    memory = batch_memory(configs["72b"], PARAMETERS["72b"], **SETTINGS)
    with pytest.raises(UserError) as refused:
        plan_gpus(memory, gpu_bytes=80 * GB, node_gpus=2)
    message = str(refused.value)
    assert "\n" not in message and "73.2B parameters = 146.4 GB of weights" in message
    assert "need 3 80 GB GPUs, the largest node has 2" in message
    # Quantized to 4 bits the weights take a quarter: 36.6 + 19.6 GB fit one GPU beside 10.9 GB of activations.
    small = batch_memory(configs["72b"], PARAMETERS["72b"], quantize="4bit", **SETTINGS)
    assert small.weight_bytes == PARAMETERS["72b"] // 2
    assert plan_gpus(small, gpu_bytes=80 * GB, node_gpus=2).gpus == 1


@pytest.mark.parametrize("share", [1.5, 2.5, 0.0])
def test_a_gpu_share_ray_would_reject_is_refused_when_the_config_is_read(share):
    with pytest.raises(UserError) as refused:
        load_config(input="in", output="out", gpus_per_replica=share)
    assert "gpus_per_replica" in str(refused.value) and "\n" not in str(refused.value)


def test_more_gpus_than_the_largest_node_is_refused():
    check_gpus_per_replica(4, 4)
    check_gpus_per_replica(0.25, 4)
    with pytest.raises(UserError, match="--gpus-per-replica 8: the largest node of the cluster has 4 GPU"):
        check_gpus_per_replica(8, 4)
    nodes = [{"Alive": True, "Resources": {"CPU": 8.0, "GPU": 4.0}}, {"Alive": False, "Resources": {"GPU": 16.0}}]
    with pytest.raises(UserError, match="--moderation-gpus 6"):
        size_replica_gpus(JobConfig(input="i", output="o", moderation_gpus=6), nodes, _unused)


def test_without_the_flag_the_count_comes_from_the_checkpoint_and_the_node(configs):
    nodes = [
        {"Alive": True, "Resources": {"CPU": 32.0, "GPU": 4.0, "accelerator_type:H100": 1.0}},
        {"Alive": True, "Resources": {"CPU": 8.0}},
    ]
    config = JobConfig(input="i", output="o", model="yi", batch_size=8, max_new_tokens=64, prompt="x" * 48)
    plan = size_replica_gpus(config, nodes, lambda model: (configs["34b"], PARAMETERS["34b"]))
    assert plan.gpus == 2 and plan.gpu_bytes == 80 * GB and "assumed" not in plan.reason
    asked = size_replica_gpus(config.model_copy(update={"gpus_per_replica": 4.0}), nodes, _unused)
    assert asked.gpus == 4 and "as asked" in asked.reason
    assert size_replica_gpus(config, [nodes[1]], _unused) is None  # no GPUs: CPU replicas
    assert node_gpu_memory({"GPU": 8.0}) == (80 * GB, True)
    assert node_gpu_memory({"GPU": 8.0, "accelerator_type:L4": 1.0}) == (24 * GB, False)


def _unused(model):
    raise AssertionError("the checkpoint is not read when the flag says how many GPUs")


# -- on a Ray cluster with four (simulated) GPUs ---------------------------------------------


@pytest.fixture
def four_gpu_node(ray_cluster):
    """A node of 2 CPUs and 4 GPUs added to the session's cluster (Ray only counts them: no CUDA here)."""
    import time

    import ray

    node = ray_cluster.add_node(num_cpus=2, num_gpus=4)
    ray_cluster.wait_for_nodes()
    deadline = time.monotonic() + 30
    while ray.cluster_resources().get("GPU", 0) < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    try:
        yield node
    finally:
        ray_cluster.remove_node(node)


def _stubbed_load(record: str, fail_once: str | None = None):
    """A stand-in for ShardProcessor whose captioner load is stubbed (it would need CUDA).

    The real ShardProcessor runs, with a captioner that records what it is handed (its GPUs, the
    devices CUDA would show) and captions by rote; with `fail_once`, the first generate anywhere
    raises torch.AcceleratorError, as an illegal memory access does. Defined in a function so
    Ray ships it by value to the replicas' processes.
    """

    def make(config, **kwargs):
        import json
        import os

        import torch

        from loupe.workers import pipeline
        from loupe.workers.models import job_models

        class Recorder:
            device = None
            decode_side = None

            def __init__(self, model, *, device=None, gpus=None, **settings):
                with open(os.path.join(record, f"{os.getpid()}.json"), "w") as out:
                    json.dump({"gpus": gpus, "device": device, "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}, out)

            def prepare(self, images):
                return len(images)

            def image_tokens(self, sizes):
                return None

            def generate(self, count):
                if fail_once is not None:
                    try:
                        os.close(os.open(fail_once, os.O_CREAT | os.O_EXCL))
                    except FileExistsError:
                        pass
                    else:
                        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
                return ["a caption"] * count

        job_models.Captioner = Recorder
        return pipeline.ShardProcessor(config, **kwargs)

    return make


def _records(folder):
    import json

    return {int(p.stem): json.loads(p.read_text()) for p in folder.glob("*.json")}


def test_two_gpus_per_replica_each_captioner_gets_its_own_two(four_gpu_node, sample_images, tmp_path):
    import ray

    from loupe.jobs.replicas import RayReplicas
    from loupe.jobs.sizing import size_replicas

    config = JobConfig(input=str(sample_images), output=str(tmp_path / "out"), model="m", tasks="caption", gpus_per_replica=2)
    resources = size_replicas(config)
    assert (resources.count, resources.device, resources.options["num_gpus"]) == (2, "cuda", 2)
    assert resources.options["num_cpus"] == resources.threads == 1  # the GPU node's 2 CPUs, one per replica
    (tmp_path / "record").mkdir()
    replicas = RayReplicas(config, resources, stages=_stubbed_load(str(tmp_path / "record")))
    try:
        placed = ray.get([actor.placement.remote() for actor in replicas.actors], timeout=60)
    finally:
        replicas.shutdown()
    ids = [tuple(p["gpu_ids"]) for p in placed]
    assert all(len(set(gpus)) == 2 for gpus in ids)
    assert sorted(gpu for gpus in ids for gpu in gpus) == ["0", "1", "2", "3"]  # two distinct pairs
    records = _records(tmp_path / "record")
    for p in placed:
        # Handed exactly Ray's GPUs: CUDA would show those two, numbered 0 and 1 in the process.
        assert records[p["pid"]] == {"gpus": [0, 1], "device": "cuda", "visible": ",".join(p["gpu_ids"])}


@pytest.mark.usefixtures("four_gpu_node")
@pytest.mark.parametrize(("share", "said"), [("1.5", "a fraction of one GPU (at most 1) or a whole number"), ("8", "the largest node of the cluster has 4 GPU")])
def test_impossible_gpu_counts_are_refused_in_one_line_at_once(sample_images, tiny_llava, tmp_path, share, said):
    import time

    from typer.testing import CliRunner

    from loupe.jobs.cli import app

    started = time.monotonic()
    result = CliRunner().invoke(
        app, ["run", str(sample_images), str(tmp_path / "out"), "--model", tiny_llava, "--tasks", "caption", "--gpus-per-replica", share]
    )
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and said in lines[0]
    assert time.monotonic() - started < 60  # no replica was started, nothing waited on one
    assert not (tmp_path / "out" / "_job.json").exists()


def test_a_lost_gpu_context_ends_the_replica_and_the_shard_completes_elsewhere(four_gpu_node, sample_images, tmp_path):
    import os

    import ray

    from loupe.jobs.planner import plan_shards
    from loupe.jobs.replicas import RayReplicas
    from loupe.jobs.sizing import size_replicas
    from loupe.jobs.scheduler import Scheduler
    from loupe.workers.storage import open_storage

    config = JobConfig(input=str(sample_images), output=str(tmp_path / "out"), model="m", tasks="caption", gpus_per_replica=2)
    (tmp_path / "record").mkdir()
    marker = tmp_path / "lost-once"
    replicas = RayReplicas(config, size_replicas(config), stages=_stubbed_load(str(tmp_path / "record"), str(marker)))
    done, failed = [], []
    try:
        before = {p["pid"] for p in ray.get([a.placement.remote() for a in replicas.actors], timeout=60)}
        shards = list(plan_shards(open_storage(config.input).list(config.input), 100))
        Scheduler(replicas, max_shard_retries=2).run(shards, done.append, lambda *failure: failed.append(failure))
        assert marker.exists() and not failed
        assert [s.attempt for s in done] == [2]  # the second attempt, on the other replica
        # The replica whose context was lost exited; Ray started a fresh process in its place.
        after = _placements_once_restarted(replicas.actors, timeout=60)
    finally:
        replicas.shutdown()
    lost = before - {p["pid"] for p in after}
    assert len(lost) == 1
    with pytest.raises(ProcessLookupError):
        os.kill(lost.pop(), 0)


def _placements_once_restarted(actors, timeout):
    import time

    import ray

    deadline = time.monotonic() + timeout
    while True:
        try:
            return ray.get([a.placement.remote() for a in actors], timeout=10)
        except ray.exceptions.RayError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_the_judge_works_while_the_replica_captions(sample_images, tmp_path, monkeypatch):
    """Call order with a fake remote judge: each batch's images go to the judge when the batch is
    prepared, before its caption is generated, and the scores are collected after it."""
    import ray

    from loupe.jobs.planner import plan_shards
    from loupe.jobs.replicas import RemoteModerator
    from loupe.schemas.taxonomy import DEFAULT_TAXONOMY
    from loupe.workers.pipeline import ShardProcessor
    from loupe.workers.storage import open_storage

    calls, batches = [], []

    class Captioner:
        device = None
        decode_side = 32

        def prepare(self, images):
            batches.append(len(images))
            return len(batches)

        def image_tokens(self, sizes):
            return None

        def generate(self, batch):
            calls.append(("generate", batch))
            return ["a caption"] * batches[batch - 1]

    class Judge:  # an actor handle: score.remote() submits, ray.get() collects
        class score:  # named as the actor method it stands for
            @staticmethod
            def remote(images):
                calls.append(("submit", len(batches)))
                return len(batches), len(images)

    def collect(pending, **kwargs):
        calls.append(("collect", pending[0]))
        return [dict.fromkeys(DEFAULT_TAXONOMY.keys, 0.25)] * pending[1]

    monkeypatch.setattr(ray, "get", collect)
    config = JobConfig(
        input=str(sample_images), output=str(tmp_path / "out"), model="m", tasks="caption,moderate",
        moderation_model="judge", batch_size=4,
    )
    processor = ShardProcessor(config, captioner=Captioner(), moderator=RemoteModerator(Judge(), decode_side=64))
    assert processor.decode_side == 64  # images decoded no smaller than the judge needs
    shard = next(plan_shards(open_storage(config.input).list(config.input), 100))
    stats = processor.process(shard)
    assert stats.rows_ok == sum(batches) and len(batches) >= 3
    for batch in range(1, len(batches) + 1):
        assert calls.index(("submit", batch)) < calls.index(("generate", batch)) < calls.index(("collect", batch))
    # The judge's next batch is already submitted before this batch's scores are collected.
    assert any(calls.index(("submit", b + 1)) < calls.index(("collect", b)) for b in range(1, len(batches)))


def test_the_summary_says_which_half_precision():
    from loupe.jobs.gpus import precision

    assert precision({"GPU": 4.0, "accelerator_type:T4": 1.0}) == "float16 (the T4 has no native bfloat16)"
    assert precision({"GPU": 8.0, "accelerator_type:V100": 1.0}).startswith("float16")
    assert precision({"GPU": 8.0, "accelerator_type:H100": 1.0}) == "bfloat16 (native on the H100)"
    config = JobConfig(input="i", output="o", gpus_per_replica=1)
    nodes = [{"Alive": True, "Resources": {"GPU": 4.0, "accelerator_type:T4": 1.0}}]
    assert size_replica_gpus(config, nodes, _unused).reason == "1 GPU(s) per replica, as asked; float16 (the T4 has no native bfloat16)"


def test_quantize_on_a_cluster_without_gpus_is_refused_in_one_line(ray_cluster):
    from loupe.jobs.sizing import size_replicas

    with pytest.raises(UserError) as refused:
        size_replicas(JobConfig(input="i", output="o", model="m", quantize="4bit"))
    assert str(refused.value) == "--quantize 4bit needs a CUDA GPU (bitsandbytes); none is available here"
    with pytest.raises(UserError, match="invalid option 'quantize'"):
        load_config(input="i", output="o", quantize="3bit")


def test_the_benchmarks_timing_waits_on_the_gpus_it_uses_not_cuda_0(monkeypatch):
    import torch

    from loupe.jobs.bench.measure import device_sync

    synced = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    device_sync(torch.device("cuda", 1))()
    assert None not in synced and 1 in synced  # never the calling thread's current device by default
    device_sync(torch.device("cpu"))()
    assert len(synced) == 2


def test_gpu_replicas_get_cpus_threads_and_a_memory_cap_by_their_share(monkeypatch):
    import ray

    from loupe.jobs.gpus import GpuPlan
    from loupe.jobs.sizing import replica_resources

    node = {"CPU": 32.0, "GPU": 8.0}
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": node}])
    monkeypatch.setattr(ray, "cluster_resources", lambda: node)
    base = {"input": "i", "output": "o", "model": "m", "tasks": "caption"}
    half = replica_resources(JobConfig(**base, gpus_per_replica=0.5))
    # 16 replicas on 8 GPUs: 2 CPUs and 2 torch threads each (not Ray's one), half a GPU's memory each.
    assert (half.count, half.options["num_cpus"], half.threads, half.memory_fraction) == (16, 2, 2, 0.5)
    planned = replica_resources(JobConfig(**base), GpuPlan(2, None, 80 * GB, "2 GPU(s) per replica: ..."))
    assert (planned.count, planned.options["num_gpus"], planned.options["num_cpus"], planned.memory_fraction) == (4, 2, 8, None)
    assert planned.sizing.startswith("2 GPU(s) per replica")
    asked = replica_resources(JobConfig(**base, cpus_per_replica=3))
    assert (asked.options["num_cpus"], asked.threads) == (3, 3)
    judged = replica_resources(JobConfig(**{**base, "tasks": "caption,moderate"}, moderation_model="j", moderation_gpus=0.5))
    assert (judged.count, judged.judge_memory_fraction, judged.memory_fraction) == (5, 0.5, None)
