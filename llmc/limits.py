"""The shapes an engine is built for: the build's limits, shared by lowering and runtime."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class BuildLimits:
    """The shapes an engine is built for; stored in the engine header."""

    max_batch_size: int = 8
    max_num_tokens: int = 512
    max_seq_len: int = 2048
    kv_block_size: int = 16

    @property
    def max_blocks_per_seq(self) -> int:
        return math.ceil(self.max_seq_len / self.kv_block_size)

    @property
    def max_num_blocks(self) -> int:
        # Enough KV blocks for every sequence of a full batch at the longest length.
        return self.max_batch_size * self.max_blocks_per_seq

    def validate(self) -> "BuildLimits":
        for name, value in asdict(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"build limit {name} must be a positive integer, got {value!r}")
        bs = self.kv_block_size
        if bs & (bs - 1) or not 8 <= bs <= 128:
            raise ValueError(
                f"kv_block_size must be a power of two from 8 to 128, got {bs}"
            )
        if self.max_num_tokens < self.max_batch_size:
            raise ValueError(
                f"max_num_tokens ({self.max_num_tokens}) must be at least max_batch_size "
                f"({self.max_batch_size}): a step decodes one token for every sequence"
            )
        return self

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BuildLimits":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown build limits {unknown}; known: {sorted(known)}")
        return cls(**data).validate()
