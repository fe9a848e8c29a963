"""Shards: schema, writer, readers, the split rule and the Lightning DataModule.

`ShardDataModule` is imported lazily so that light commands (``qdd-cli shard``) that only
need the writer do not import Lightning.
"""

from typing import Any

__all__ = ["ShardDataModule"]


def __getattr__(name: str) -> Any:
    if name == "ShardDataModule":
        from qdd.datamodules.shard import ShardDataModule

        return ShardDataModule
    raise AttributeError(name)
