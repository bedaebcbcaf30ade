"""The job config: one object, validated once at the entry point."""

from __future__ import annotations

import os
import tomllib
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from loupe.schemas.errors import UserError
from loupe.schemas.taxonomy import DEFAULT_TAXONOMY, Taxonomy, load_taxonomy

DEFAULT_MODEL = "llava-hf/llava-1.5-7b-hf"
DEFAULT_PROMPT = "Describe this image in one or two sentences."
DEFAULT_IMAGE_EMBEDDING_MODEL = "openai/clip-vit-base-patch32"
DEFAULT_TEXT_EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
TASKS = ("caption", "moderate", "embed", "hash")
DEFAULT_TASKS = TASKS

# The settings that decide what the output rows contain. A rerun whose plan settings equal
# the frozen ones resumes; any difference is a different job. Batch size, replica count and
# the cluster address change only how fast the rows come, so they may change between runs.
PLAN_FIELDS = (
    "input",
    "tasks",
    "model",
    "prompt",
    "max_new_tokens",
    "min_new_tokens",
    "shard_size",
    "image_column",
)


class JobConfig(BaseModel):
    """Everything `loupe run` needs, from flags and an optional TOML job file."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    input: str = Field(min_length=1, description="local folder, s3://bucket/prefix/, .tar or .parquet")
    output: str = Field(min_length=1, description="local folder or s3://bucket/prefix/")
    model: str = Field(DEFAULT_MODEL, min_length=1, description="Hugging Face id or local path")
    prompt: str = Field(DEFAULT_PROMPT, min_length=1)
    max_new_tokens: int = Field(64, ge=1, le=4096)
    min_new_tokens: int = Field(0, ge=0, le=4096)
    batch_size: int = Field(8, ge=1, le=1024)
    shard_size: int = Field(1000, ge=1, le=1_000_000)
    replicas: int | None = Field(None, ge=1, le=4096)
    gpus_per_replica: float | None = Field(
        None, gt=0, le=64, description="default: worked out from the checkpoint's size and the cluster's GPUs"
    )
    cpus_per_replica: int | None = Field(
        None, ge=1, le=256, description="CPUs (and torch threads) beside each GPU replica; default: a share of the node's"
    )
    quantize: Literal["8bit", "4bit"] | None = Field(None, description="load weights through bitsandbytes (GPU only)")
    ray_address: str | None = None
    endpoint_url: str | None = None
    image_column: str = Field("image", min_length=1)
    max_shard_retries: int = Field(2, ge=0, le=100)
    shard_timeout_s: float | None = Field(
        None, gt=0, description="seconds a replica may give no result before it is taken for hung (default: derived)"
    )
    retry_errors: bool = False  # process again the rows of a done job whose code is transient
    overwrite: bool = False
    incremental: bool = False  # on a complete job: plan only the objects INPUT gained since
    replan_changed: bool = False  # with incremental: process again objects whose size or ETag changed
    tasks: tuple[str, ...] = DEFAULT_TASKS
    taxonomy: Taxonomy = DEFAULT_TAXONOMY
    moderation_model: str | None = Field(None, min_length=1, description="default: the captioning model")
    moderation_gpus: float | None = Field(
        None, gt=0, le=64, description="GPUs of a separate moderation replica (default: same as captioning)"
    )
    image_embedding_model: str = Field(DEFAULT_IMAGE_EMBEDDING_MODEL, min_length=1, description="a CLIP checkpoint")
    text_embedding_model: str = Field(DEFAULT_TEXT_EMBEDDING_MODEL, min_length=1, description="a sentence model")
    text_column: str | None = Field(
        None, min_length=1, description="embed this source text (a WebDataset sidecar or Parquet column) for the caption index"
    )
    build_index: bool = True
    index_memory_budget: int = Field(4 << 30, gt=0, description="bytes the index may take in memory")
    index_target_recall: float = Field(0.95, gt=0, le=1)
    match_list: str | None = Field(
        None, min_length=1, description="known PDQ hashes (a local path or s3:// URI) to match every image against"
    )
    # Set by the runner from the list it read and validated: the list's content decides rows.
    match_list_sha256: str | None = None

    @field_validator("tasks", mode="before")
    @classmethod
    def _known_tasks(cls, value: Any) -> tuple[str, ...]:
        names = [t.strip() for t in value.split(",")] if isinstance(value, str) else list(value)
        unknown = [t for t in names if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task {unknown[0]!r}; choose from {', '.join(TASKS)}")
        if not names:
            raise ValueError("at least one task is needed")
        return tuple(t for t in TASKS if t in names)  # canonical order: the plan compares equal

    @field_validator("input")
    @classmethod
    def _input_location(cls, value: str) -> str:
        return normalize_location(value) if "://" not in value or value.startswith("file://") else value

    @field_validator("taxonomy", mode="before")
    @classmethod
    def _taxonomy_from_path(cls, value: Any) -> Any:
        return load_taxonomy(value) if isinstance(value, (str, Path)) else value

    @field_validator("min_new_tokens")
    @classmethod
    def _min_not_above_max(cls, value: int, info: Any) -> int:
        maximum = info.data.get("max_new_tokens")
        if maximum is not None and value > maximum:
            raise ValueError(f"must not exceed max_new_tokens ({maximum})")
        return value

    @field_validator("match_list")
    @classmethod
    def _match_list_needs_hashes(cls, value: str | None, info: Any) -> str | None:
        tasks = info.data.get("tasks")
        if value is not None and tasks is not None and "hash" not in tasks:
            raise ValueError("matching needs the hash task: add hash to --tasks")
        return value

    @field_validator("gpus_per_replica", "moderation_gpus")
    @classmethod
    def _gpu_share(cls, value: float | None) -> float | None:
        # Ray places a fraction of one GPU or whole GPUs; 1.5 would fail with judges already started.
        if value is not None and value > 1 and value != int(value):
            raise ValueError(f"a fraction of one GPU (at most 1) or a whole number of GPUs, not {value:g}")
        return value

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint_is_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value

    @property
    def moderates(self) -> bool:
        return "moderate" in self.tasks

    @property
    def captions(self) -> bool:
        return "caption" in self.tasks

    @property
    def embeds(self) -> bool:
        return "embed" in self.tasks

    @property
    def hashes(self) -> bool:
        return "hash" in self.tasks

    @property
    def judge(self) -> str:
        """The checkpoint that scores moderation categories."""
        return self.moderation_model or self.model

    def plan_settings(self) -> dict[str, Any]:
        """The settings frozen into the job plan (see PLAN_FIELDS), as JSON-ready values."""
        settings: dict[str, Any] = {name: getattr(self, name) for name in PLAN_FIELDS}
        settings["tasks"] = list(self.tasks)
        settings["quantize"] = self.quantize  # 8-bit or 4-bit weights give other captions and scores
        if self.moderates:
            settings["moderation_model"] = self.judge
            settings["taxonomy_sha256"] = self.taxonomy.content_hash()
            settings["taxonomy"] = [asdict(c) for c in self.taxonomy.categories]
        if self.embeds:
            settings["image_embedding_model"] = self.image_embedding_model
            settings["text_embedding_model"] = self.text_embedding_model
            settings["text_column"] = self.text_column
        if self.match_list is not None:
            settings["match_list_sha256"] = self.match_list_sha256
        return settings


def normalize_location(uri: str) -> str:
    """INPUT as the place it names, for comparing jobs: an absolute path, or s3://bucket/prefix
    without a trailing slash ("photos", "./photos/" and "/abs/photos" are one folder)."""
    if "://" in uri and not uri.startswith("file://"):
        scheme, _, rest = uri.partition("://")
        return f"{scheme}://{rest.rstrip('/')}"
    return os.path.abspath(uri.removeprefix("file://"))


def load_config(config_file: str | Path | None = None, **overrides: Any) -> JobConfig:
    """Build the job config from a TOML file, then flags; None-valued flags do not override."""
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(_read_toml(Path(config_file)))
    values.update({key: value for key, value in overrides.items() if value is not None})
    try:
        return JobConfig(**values)
    except ValidationError as exc:
        raise UserError(_describe(exc, config_file)) from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"config file {path} is not valid TOML: {exc}") from None
    # TOML users write either max-new-tokens or max_new_tokens; the CLI flags use dashes.
    return {key.replace("-", "_"): value for key, value in data.items()}


def _describe(exc: ValidationError, config_file: str | Path | None) -> str:
    error = exc.errors()[0]
    field = ".".join(str(part) for part in error["loc"]) or "config"
    where = f" (in {config_file})" if config_file else ""
    if error["type"] == "extra_forbidden":
        return f"unknown option '{field}'{where}"
    if error["type"] == "missing":
        return f"option '{field}' is required{where}"
    message = error["msg"].removeprefix("Value error, ")
    return f"invalid option '{field}': {message}{where}"
