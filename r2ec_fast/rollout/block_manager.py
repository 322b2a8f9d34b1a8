"""Block manager: which KV blocks are free, and how many block tables hold each one.

The cache is `num_blocks` blocks of `block_size` token slots (DESIGN §4.4); a sequence's block
table lists the blocks that hold its positions 0, bs, 2bs, ... in order. Blocks are reference
counted so that the G samples of a group hold the prompt's blocks once: after the group's
prefill, `fork` gives every sample the group's table and one reference per block. A block whose
count is above one is read-only: the first sample to write into it (the prompt's partial last
block, at its first decoded token) gets a private copy (`writable_slot`, copy on write), and the
last holder writes in place.
"""
from __future__ import annotations

import math
from collections import deque


class OutOfBlocks(RuntimeError):
    """Raised when an allocation does not fit; the scheduler answers it by preempting."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks} and "
                             f"{block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.ref_count = [0] * num_blocks
        self._free = deque(range(num_blocks))
        self.peak_used = 0

    # ---------------------------------------------------------------- counts

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    # ---------------------------------------------------------------- allocation

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise OutOfBlocks(f"{count} blocks wanted, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(count)]
        for b in blocks:
            self.ref_count[b] = 1
        self.peak_used = max(self.peak_used, self.num_used)
        return blocks

    def share(self, blocks: list[int]) -> None:
        for b in blocks:
            if self.ref_count[b] < 1:
                raise RuntimeError(f"block {b} is free: it cannot be shared")
            self.ref_count[b] += 1

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            if self.ref_count[b] < 1:
                raise RuntimeError(f"block {b} released more often than it was held")
            self.ref_count[b] -= 1
            if self.ref_count[b] == 0:
                self._free.append(b)

    def fork(self, table: list[int], copies: int) -> list[list[int]]:
        """`copies` tables that share `table`'s blocks; the caller's references pass to them."""
        for _ in range(copies - 1):
            self.share(table)
        if copies == 0:
            self.release(table)
        return [list(table) for _ in range(copies)]

    def grow(self, table: list[int], num_tokens: int) -> None:
        """Append fresh blocks to `table` until it covers `num_tokens` positions."""
        missing = self.blocks_for(num_tokens) - len(table)
        if missing > 0:
            table.extend(self.allocate(missing))

    def writable_slot(self, table: list[int], position: int) -> tuple[int, tuple[int, int] | None]:
        """The cache slot for writing `position` of the sequence that owns `table`, after
        making its block private: a new block at a block boundary, a copy of a shared block
        otherwise. Returns (slot, (src, dst) block copy to do first, or None)."""
        index, offset = divmod(position, self.block_size)
        if index > len(table):
            raise RuntimeError(f"position {position} skips a block (table has {len(table)})")
        copy = None
        if index == len(table):
            table.extend(self.allocate(1))
        elif self.ref_count[table[index]] > 1:
            (dst,) = self.allocate(1)
            copy = (table[index], dst)
            self.release([table[index]])
            table[index] = dst
        return table[index] * self.block_size + offset, copy
