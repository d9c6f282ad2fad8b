"""Dataset preparation (WebDataset shards + manifest), inspection, the data plan and the per-rank loader."""

from gan_dist.data.loader import Batch, BatchIterator, build_loader, decode_image, to_float
from gan_dist.data.manifest import MANIFEST_NAME, Manifest, ShardInfo, read_manifest, write_manifest
from gan_dist.data.plan import DataPlan, DataPosition, Layout
from gan_dist.data.prepare import prepare
from gan_dist.data.shards import list_shards, plan_data, read_shard

__all__ = [
    "MANIFEST_NAME",
    "Batch",
    "BatchIterator",
    "DataPlan",
    "DataPosition",
    "Layout",
    "Manifest",
    "ShardInfo",
    "build_loader",
    "decode_image",
    "list_shards",
    "plan_data",
    "prepare",
    "read_manifest",
    "read_shard",
    "to_float",
    "write_manifest",
]
