"""The dataset manifest: what ``prepare`` wrote, so loaders and checks need not open every shard.

Optional fields added later (``class_counts``, per-shard ``labels``) default to None: older manifests load.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gan_dist.storage import StorageConfig
from gan_dist.storage import exists, join, read_bytes, write_bytes

MANIFEST_NAME = "manifest.json"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ShardInfo(_Model):
    name: str = Field(description="File name inside the dataset directory")
    num_samples: int = Field(ge=0)
    bytes: int = Field(ge=0)
    sha256: str
    labels: list[int] | None = Field(None, description="Class index of each sample, in tar order")

    @model_validator(mode="after")
    def _one_label_per_sample(self) -> ShardInfo:
        if self.labels is not None and len(self.labels) != self.num_samples:
            raise ValueError(f"{self.name}: {len(self.labels)} labels for {self.num_samples} samples")
        return self


class SkippedInput(_Model):
    path: str
    reason: str


class Manifest(_Model):
    format_version: Literal[1] = 1
    num_samples: int = Field(ge=0)
    resolution: int = Field(ge=1)
    channels: Literal[1, 3]
    image_format: Literal["png", "jpeg"]
    labels: list[str] | None = Field(None, description="Class names; the stored cls label indexes this list")
    class_counts: list[int] | None = Field(None, description="Samples per class, aligned with labels")
    shards: list[ShardInfo]
    skipped: list[SkippedInput] = []
    settings: dict[str, Any] = Field(default_factory=dict, description="The prepare settings that produced it")
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))


def write_manifest(
    manifest: Manifest, out_dir: str | os.PathLike[str], storage: StorageConfig | None = None
) -> str:
    """Write ``manifest.json`` into a directory or ``s3://`` prefix; readers see the old file or the new one."""
    target = join(str(out_dir), MANIFEST_NAME)
    write_bytes(target, manifest.model_dump_json(indent=2).encode(), storage or StorageConfig())
    return target


def read_manifest(url_or_dir: str | os.PathLike[str], storage: StorageConfig | None = None) -> Manifest | None:
    """The manifest of a dataset directory or remote prefix, or None when there is none."""
    storage = storage or StorageConfig()
    path = join(str(url_or_dir), MANIFEST_NAME)
    if not exists(path, storage):
        return None
    return Manifest.model_validate_json(read_bytes(path, storage))
