"""Dataset preparation (WebDataset shards + manifest) and the per-rank streaming loader."""

from gan_dist.data.loader import assign_shards, build_loader, check_sharding, list_shards, to_float
from gan_dist.data.manifest import MANIFEST_NAME, Manifest, ShardInfo, read_manifest, write_manifest
from gan_dist.data.prepare import prepare

__all__ = [
    "MANIFEST_NAME",
    "Manifest",
    "ShardInfo",
    "assign_shards",
    "build_loader",
    "check_sharding",
    "list_shards",
    "prepare",
    "read_manifest",
    "to_float",
    "write_manifest",
]
