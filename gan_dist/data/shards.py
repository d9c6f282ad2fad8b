"""Where a dataset's shards are, how many samples each holds, how they are dealt out, and reading one.

URLs: a local directory, an ``s3://bucket/prefix`` or ``http(s)://host/prefix`` dataset prefix (with
``manifest.json``), a brace pattern (``.../shard-{000000..000009}.tar``) or a single ``.tar``. Remote shards
are opened through handlers registered with webdataset's ``gopen`` (it has no s3 handler, and its http one
shells out to curl without resuming), built on ``gan_dist.storage``.
"""

from __future__ import annotations

import fnmatch
import logging
import random
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from braceexpand import braceexpand
from webdataset.gopen import gopen, gopen_schemes
from webdataset.tariterators import group_by_keys, tar_file_expander

from gan_dist.config import GanConfig
from gan_dist.data.manifest import MANIFEST_NAME, Manifest, read_manifest
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


def check_sharding(num_shards: int, world_size: int, loader_workers: int, mode: str = "exact") -> None:
    """Fail early when some (rank, loader worker) would get no shard in exact mode and silently starve."""
    need = world_size * max(1, loader_workers) if mode == "exact" else 1
    if num_shards < need:
        raise ValueError(
            f"data.url has {num_shards} shard(s) but scaling.num_workers={world_size} x "
            f"data.loader_workers={loader_workers} needs at least {need}, one per loader worker, in exact mode; "
            "re-run prepare with a smaller samples_per_shard, lower data.loader_workers or set data.mode=resampled"
        )


def assign_shards(
    shards: list[str], *, rank: int, world_size: int, worker: int, num_workers: int, epoch: int, seed: int
) -> list[str]:
    """This (rank, worker)'s shards for ``epoch``: disjoint from every other pair, reshuffled each epoch."""
    order = list(shards)
    random.Random(f"shards/{seed}/{epoch}").shuffle(order)  # str seed: same on every host and process
    return order[rank::world_size][worker::num_workers]


@dataclass(frozen=True)
class DataPlan:
    """Everything the loader needs to know before reading: shards, their sample counts, the epoch length."""

    shards: list[str]
    counts: list[int]  # samples per shard, from the manifest
    batches_per_epoch: int  # per rank: total samples // global batch, the same on every rank
    manifest: Manifest


def plan_data(cfg: GanConfig, world_size: int) -> DataPlan:
    """Check ``cfg.data`` against the dataset (before training starts) and return the plan; ValueError if unfit.

    Per-shard sample counts come from the manifest: they fix the epoch length, so every rank can yield the
    same number of batches whatever the shard sizes.
    """
    url, storage = cfg.data.url, cfg.storage
    shards = list_shards(url, storage)
    manifest = read_manifest(dataset_base(url), storage)
    if manifest is None:
        raise ValueError(
            f"{url}: no {MANIFEST_NAME} next to the shards; the loader needs the per-shard sample counts it "
            "holds (write the dataset with `gan-dist prepare`)"
        )
    if manifest.resolution != cfg.data.resolution:
        raise ValueError(f"{url} holds {manifest.resolution}px images but data.resolution={cfg.data.resolution}")
    known = {s.name: s.num_samples for s in manifest.shards}
    unknown = [s for s in shards if _name(s) not in known]
    if unknown:
        raise ValueError(f"{url}: {len(unknown)} shard(s) are not in {MANIFEST_NAME} (first: {unknown[0]})")
    check_sharding(len(shards), world_size, cfg.data.loader_workers, cfg.data.mode)
    counts = [known[_name(s)] for s in shards]
    global_batch = cfg.per_worker_batch() * world_size
    if sum(counts) < global_batch:
        raise ValueError(f"{url}: {sum(counts)} samples are fewer than one global batch of {global_batch}")
    return DataPlan(shards=shards, counts=counts, batches_per_epoch=sum(counts) // global_batch, manifest=manifest)


def read_shard(url: str, storage: StorageConfig) -> Iterator[dict[str, Any]]:
    """The samples of one shard in tar order (``__key__``, ``__url__``, one entry per file extension).

    A damaged shard (unreadable object, truncated or garbled tar) ends early with a warning and no exception:
    callers compare what they got with the manifest's count. Nothing sleeps.
    """
    try:
        with gopen(url, storage=storage) as stream:  # local paths: plain open(); remote: _gopen_remote
            files = tar_file_expander([{"url": url, "stream": stream}])  # default handler: re-raise
            yield from group_by_keys(files)
    except _READ_ERRORS as exc:
        log.warning("%s: stopped reading after a damaged section: %s", url, exc)
