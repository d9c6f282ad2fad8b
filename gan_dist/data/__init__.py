"""Dataset preparation (WebDataset shards + manifest), inspection, and the per-rank streaming loader."""

from gan_dist.data.loader import BatchIterator, build_loader, decode_image, to_float
from gan_dist.data.manifest import MANIFEST_NAME, Manifest, ShardInfo, read_manifest, write_manifest
from gan_dist.data.prepare import prepare
from gan_dist.data.shards import DataPlan, assign_shards, check_sharding, list_shards, plan_data, read_shard

__all__ = [
    "MANIFEST_NAME",
    "BatchIterator",
    "DataPlan",
    "Manifest",
    "ShardInfo",
    "assign_shards",
    "build_loader",
    "check_sharding",
    "decode_image",
    "list_shards",
    "plan_data",
    "prepare",
    "read_manifest",
    "read_shard",
    "to_float",
    "write_manifest",
]
