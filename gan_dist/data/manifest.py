"""The dataset manifest: what ``prepare`` wrote, so loaders and checks need not open every shard."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MANIFEST_NAME = "manifest.json"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ShardInfo(_Model):
    name: str = Field(description="File name inside the dataset directory")
    num_samples: int = Field(ge=0)
    bytes: int = Field(ge=0)
    sha256: str


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
    shards: list[ShardInfo]
    skipped: list[SkippedInput] = []
    settings: dict[str, Any] = Field(default_factory=dict, description="The prepare settings that produced it")
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))


def write_manifest(manifest: Manifest, out_dir: str | os.PathLike[str]) -> Path:
    """Write ``manifest.json`` atomically: readers see the old file or the new one, never half of one."""
    target = Path(out_dir) / MANIFEST_NAME
    tmp = target.with_name(f".{MANIFEST_NAME}.{os.getpid()}.tmp")  # plain open(): keeps the umask's permissions
    try:
        tmp.write_text(manifest.model_dump_json(indent=2))
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def read_manifest(url_or_dir: str | os.PathLike[str]) -> Manifest | None:
    """The manifest of a local dataset directory, or None when there is none (or the URL is remote)."""
    path = Path(url_or_dir) / MANIFEST_NAME
    if "://" in str(url_or_dir) or not path.is_file():
        return None
    return Manifest.model_validate_json(path.read_text())
