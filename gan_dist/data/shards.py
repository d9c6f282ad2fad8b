"""Where a dataset's shards are, the checks and plan a config gets from its manifest, and reading one shard.

URLs: a local directory, an ``s3://bucket/prefix`` or ``http(s)://host/prefix`` dataset prefix (with
``manifest.json``), a brace pattern (``.../shard-{000000..000009}.tar``) or a single ``.tar``. Remote shards
are opened through handlers registered with webdataset's ``gopen`` (it has no s3 handler, and its http one
shells out to curl without resuming), built on ``gan_dist.storage``.
"""

from __future__ import annotations

import fnmatch
import logging
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from braceexpand import braceexpand
from webdataset.gopen import gopen, gopen_schemes
from webdataset.tariterators import group_by_keys, tar_file_expander

from gan_dist.config import GanConfig
from gan_dist.data.manifest import MANIFEST_NAME, Manifest, read_manifest
from gan_dist.data.plan import DataPlan
from gan_dist.storage import StorageConfig, is_remote, is_s3, join, list_objects, open_stream

log = logging.getLogger("gan_dist.data")

# What a damaged shard can raise while being read: the read stops there and the rest counts as skipped.
_READ_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError)  # StorageError is an OSError


def _gopen_remote(
    url: str, mode: str = "rb", bufsize: int = 8192, storage: StorageConfig | None = None, **_: Any
) -> BinaryIO:
    """webdataset gopen handler for s3:// and http(s)://: streaming, with retries and resume on transient errors."""
    if mode != "rb":
        raise ValueError(f"{url}: only reading is supported (mode {mode!r})")
    return open_stream(url, storage or StorageConfig())


for _scheme in ("s3", "http", "https"):
    gopen_schemes[_scheme] = _gopen_remote


def _parent(url: str) -> str:
    return url.rsplit("/", 1)[0] if is_remote(url) else str(Path(url).parent)


def _name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def dataset_base(url: str) -> str:
    """The directory/prefix that holds the manifest for ``url``."""
    return _parent(url) if "{" in url or url.endswith(".tar") else url


def list_shards(url: str, storage: StorageConfig) -> list[str]:
    """Shard paths/URLs of a dataset directory or prefix (manifest order), a brace pattern, or a single .tar."""
    if "{" in url:
        shards = list(braceexpand(url))
        missing = [] if is_remote(url) else [s for s in shards if not Path(s).is_file()]
        if missing:
            raise ValueError(f"{url}: {len(missing)} of {len(shards)} shards do not exist (first: {missing[0]})")
        return shards
    if url.endswith(".tar"):
        if not is_remote(url) and not Path(url).is_file():
            raise ValueError(f"{url}: not a shard directory, an existing .tar file or a brace pattern")
        return [url]
    if not is_remote(url) and not Path(url).is_dir():
        raise ValueError(f"{url}: not a shard directory, an existing .tar file or a brace pattern")
    manifest = read_manifest(url, storage)
    if manifest is not None:
        return [join(url, s.name) for s in manifest.shards]
    if is_remote(url) and not is_s3(url):
        raise ValueError(f"{url}: no {MANIFEST_NAME} here; over http(s) give a brace pattern or a prepared dataset")
    if is_s3(url):
        prefix = url.rstrip("/") + "/"
        shards = [s for s in list_objects(url, storage) if fnmatch.fnmatch(s[len(prefix) :], "shard-*.tar")]
    else:
        shards = sorted(str(p) for p in Path(url).glob("shard-*.tar"))
    if not shards:
        raise ValueError(f"{url}: no {MANIFEST_NAME} or shard-*.tar files here; run `gan-dist prepare` first")
    return shards


def _kind(channels: int) -> str:
    return "grayscale (1 channel)" if channels == 1 else "RGB (3 channels)"


def _check_manifest(cfg: GanConfig, manifest: Manifest) -> None:
    """The image facts the config must agree with: resolution and channels."""
    url, data = cfg.data.url, cfg.data
    if manifest.resolution != data.resolution:
        raise ValueError(f"{url} holds {manifest.resolution}px images but data.resolution={data.resolution}")
    if manifest.channels != data.channels:
        raise ValueError(
            f"{url} holds {_kind(manifest.channels)} images but data.channels={data.channels}; set "
            f"data.channels={manifest.channels} or re-run prepare with --channels {data.channels}"
        )


def plan_data(cfg: GanConfig, world_size: int) -> DataPlan:
    """Check ``cfg.data`` against the dataset and return the plan; ValueError naming the problem if unfit.

    Called by the driver before Ray starts (with ``scaling.num_workers``) and by every loader (with the live
    world size). Per-shard sample counts come from the manifest: they fix the sample ids and the epoch.
    """
    url, storage, batch = cfg.data.url, cfg.storage, cfg.train.batch_size
    if not 1 <= world_size <= batch:
        raise ValueError(f"train.batch_size={batch} (the global batch) cannot give each of {world_size} ranks a sample")
    shards = list_shards(url, storage)
    manifest = read_manifest(dataset_base(url), storage)
    if manifest is None:
        raise ValueError(
            f"{url}: no {MANIFEST_NAME} next to the shards; the loader needs the per-shard sample counts it "
            "holds (write the dataset with `gan-dist prepare`)"
        )
    _check_manifest(cfg, manifest)
    known = {s.name: s for s in manifest.shards}
    unknown = [s for s in shards if _name(s) not in known]
    if unknown:
        raise ValueError(f"{url}: {len(unknown)} shard(s) are not in {MANIFEST_NAME} (first: {unknown[0]})")
    infos = [known[_name(s)] for s in shards]
    counts = [s.num_samples for s in infos]
    if sum(counts) < batch:
        raise ValueError(f"{url}: {sum(counts)} samples are fewer than one global batch of {batch}")
    per_sample = all(s.labels is not None for s in infos)
    if cfg.data.class_balance and not (per_sample and manifest.labels):
        raise ValueError(
            f"data.class_balance needs per-sample class labels in the {MANIFEST_NAME} of {url}, which has "
            f"{'none' if not manifest.labels else 'only class names (prepared before labels were stored)'}: "
            "re-run `gan-dist prepare` on a labelled source, or set data.class_balance=false"
        )
    return DataPlan(
        shards=tuple(shards),
        counts=tuple(counts),
        batch_size=batch,
        seed=cfg.train.seed,
        mode=cfg.data.mode,
        shuffle_buffer=cfg.data.shuffle_buffer,
        class_balance=cfg.data.class_balance,
        labelled=manifest.labels is not None,
        labels=np.concatenate([np.asarray(s.labels, dtype=np.int64) for s in infos]) if per_sample else None,
        class_names=tuple(manifest.labels or ()),
        class_counts=tuple(manifest.class_counts or ()),
    )


def read_shard(url: str, storage: StorageConfig) -> Iterator[dict[str, Any]]:
    """The samples of one shard in tar order (``__key__``, ``__url__``, one entry per file extension).

    A damaged shard (unreadable object, truncated or garbled tar) ends early with a warning and no exception:
    the manifest tells callers what is missing. Nothing sleeps.
    """
    try:
        with gopen(url, storage=storage) as stream:  # local paths: plain open(); remote: _gopen_remote
            files = tar_file_expander([{"url": url, "stream": stream}])  # default handler: re-raise
            yield from group_by_keys(files)
    except _READ_ERRORS as exc:
        log.warning("%s: stopped reading after a damaged section: %s", url, exc)
