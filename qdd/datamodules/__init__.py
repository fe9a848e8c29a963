"""Shards: schema, writer, readers and the Lightning DataModules.

`ShardDataModule` (shard folders as they are) and `MixDataModule` (a weighted mix of
training sources with held-out val/test splits) are imported lazily so that light
commands (``qdd-cli shard``) that only need the writer do not import Lightning.
"""

from typing import Any

__all__ = ["MixDataModule", "ShardDataModule"]


def __getattr__(name: str) -> Any:
    if name == "ShardDataModule":
        from qdd.datamodules.shard import ShardDataModule

        return ShardDataModule
    if name == "MixDataModule":
        from qdd.datamodules.mix import MixDataModule

        return MixDataModule
    raise AttributeError(name)
