"""Scheduler: continuous batching of groups under a KV budget, with preemption by recompute.

Each engine step is either a prefill (admit waiting groups) or a decode (one token for every
running sample):

- A new group is admitted as soon as its prompt fits (blocks for the prompt, the copies of its
  partial last block, and one block of headroom per running sample) and the number of running
  sequences stays within `max_num_seqs`; so groups enter while others are still decoding.
- Its prefill is one row over the whole prompt; the G first tokens are drawn from that row's
  last logits, then the samples fork the prompt's blocks (`BlockManager.fork`).
- When a decode step cannot get a block, the most recently admitted group is preempted: its
  blocks are freed and it goes back to the front of the queue with what it generated. When it is
  admitted again its prompt's full blocks are prefilled once (shared again) and each sample
  recomputes the rest (the prompt's tail and its own tokens, all but the last, whose K/V the
  next decode step writes) in its own blocks, in the same forward.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager, OutOfBlocks
from .sequence import Group, Sequence, Status


@dataclass
class Row:
    """One query chunk of a forward: `tokens` at positions start.. in the blocks of `table`."""

    tokens: list[int]
    start: int
    table: list[int]
    slots: list[int]
    draw_for: list[Sequence] = field(default_factory=list)  # sampled from the last logits


@dataclass
class Batch:
    prefill: bool
    rows: list[Row]
    copies: list[tuple[int, int]] = field(default_factory=list)  # block copies to do first
    forks: list[Group] = field(default_factory=list)  # groups to fork after this forward


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_prefill_tokens: int):
        self.blocks = blocks
        self.max_num_seqs, self.max_prefill_tokens = max_num_seqs, max_prefill_tokens
        self.waiting: deque[Group] = deque()
        self.running: list[Group] = []  # in admission order: the last is preempted first
        self.num_preemptions = 0

    def add(self, group: Group) -> None:
        self.waiting.append(group)

    @property
    def finished(self) -> bool:
        return not self.waiting and all(g.done for g in self.running)

    def num_running_seqs(self) -> int:
        return sum(len(g.live) for g in self.running)

    # ---------------------------------------------------------------- step

    def schedule(self) -> Batch:
        self.running = [g for g in self.running if not g.done]
        batch = self._admit()
        if batch.rows:
            return batch
        if not self.running:
            raise RuntimeError("nothing to run: the KV budget cannot hold one group (the engine "
                               "checks this before generating; please report)")
        return self._decode()

    def _slots(self, table: list[int], start: int, count: int) -> list[int]:
        bs = self.blocks.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, start + count)]

    def _admit(self) -> Batch:
        batch = Batch(prefill=True, rows=[])
        tokens = 0
        while self.waiting:
            group = self.waiting[0]
            live = group.live
            # headroom: a block per running sample, so that admitting does not force the
            # next decode step to preempt (a lone group always fits: the engine checked it)
            headroom = self.num_running_seqs() + len(live) if self.running else 0
            need = self._blocks_needed(group) + headroom
            full = tokens > 0 and tokens + self._prefill_tokens(group) > self.max_prefill_tokens
            if need > self.blocks.num_free or full or (
                    self.running and self.num_running_seqs() + len(live) > self.max_num_seqs):
                break
            self.waiting.popleft()
            tokens += self._prefill_tokens(group)
            self.running.append(group)
            for seq in live:
                seq.status = Status.RUNNING
            if any(s.output for s in live):
                self._recompute_rows(group, batch)
            else:
                self._prompt_row(group, batch)
        return batch

    def _blocks_needed(self, group: Group) -> int:
        p, bs = len(group.prompt), self.blocks.block_size
        if not any(s.output for s in group.live):
            return self.blocks.blocks_for(p) + (len(group.live) - 1) * (p % bs != 0)
        full = p // bs
        return full + sum(self.blocks.blocks_for(s.num_tokens) - full for s in group.live)

    def _prefill_tokens(self, group: Group) -> int:
        if not any(s.output for s in group.live):
            return len(group.prompt)
        return len(group.prompt) + sum(s.num_tokens - 1 - len(group.prompt) for s in group.live)

    def _prompt_row(self, group: Group, batch: Batch) -> None:
        p = len(group.prompt)
        group.block_table = self.blocks.allocate(self.blocks.blocks_for(p))
        batch.rows.append(Row(list(group.prompt), 0, group.block_table,
                              self._slots(group.block_table, 0, p), draw_for=group.live))
        batch.forks.append(group)

    def _recompute_rows(self, group: Group, batch: Batch) -> None:
        """A preempted group: the prompt's full blocks once, each sample's rest in its own."""
        live, bs = group.live, self.blocks.block_size
        shared = len(group.prompt) // bs * bs
        table = self.blocks.allocate(shared // bs)
        if shared:
            batch.rows.append(Row(group.prompt[:shared], 0, table, self._slots(table, 0, shared)))
        for seq, own in zip(live, self.blocks.fork(table, len(live))):
            seq.block_table = own
            self.blocks.grow(own, seq.num_tokens)
            count = seq.num_tokens - 1 - shared  # the last token is fed by the next decode
            if count > 0:
                tokens = [seq.token(q) for q in range(shared, shared + count)]
                batch.rows.append(Row(tokens, shared, own, self._slots(own, shared, count)))

    def _decode(self) -> Batch:
        batch = Batch(prefill=False, rows=[])
        for group in list(self.running):
            if group not in self.running:  # preempted below to make room for an earlier one
                continue
            for seq in group.live:
                position = seq.num_tokens - 1
                while True:
                    try:
                        slot, copy = self.blocks.writable_slot(seq.block_table, position)
                        break
                    except OutOfBlocks:
                        victim = self.running[-1]
                        self._preempt(victim, batch)
                        if victim is group:
                            break
                if group not in self.running:
                    break
                if copy is not None:
                    batch.copies.append(copy)
                batch.rows.append(Row([seq.token(position)], position, seq.block_table, [slot],
                                      draw_for=[seq]))
        return batch

    def _preempt(self, group: Group, batch: Batch) -> None:
        self.num_preemptions += 1
        self.running.remove(group)
        mine = {id(s) for s in group.samples}
        batch.rows = [r for r in batch.rows if not (r.draw_for and id(r.draw_for[0]) in mine)]
        for seq in group.live:
            self.blocks.release(seq.block_table)
            seq.block_table, seq.status = [], Status.WAITING
        # copies into blocks that were just freed are moot (and their blocks may be reused)
        batch.copies = [c for c in batch.copies if self.blocks.ref_count[c[1]] > 0]
        self.waiting.appendleft(group)


def shared_prefixes(rows, block_size: int, members_per: int):
    """Cascade decoding's hint for a decode batch: (members [P][members_per] row indices, -1
    padded; prefix_lens [rows]). The rows of a group whose block tables begin with the same
    pages (its prompt's full blocks, held once since the fork) form one prefix over those
    pages; checked page by page here, so it never claims more than is shared."""
    by_group: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        if r.draw_for:
            by_group.setdefault(id(r.draw_for[0].group), []).append(i)
    members, lens = [], [0] * len(rows)
    for idx in by_group.values():
        if len(idx) < 2:
            continue
        tables = [rows[i].table for i in idx]
        # keys [0, n * block_size) must precede every member's query (position r.start)
        n = min(min(len(t) for t in tables), min(rows[i].start for i in idx) // block_size,
                len(rows[idx[0]].draw_for[0].group.prompt) // block_size)
        first = tables[0][:n]
        if any(t[:n] != first for t in tables):  # not the whole prompt: the shared part
            n = next(k for k in range(n) if any(t[k] != first[k] for t in tables))
        if n == 0:
            continue
        for c in range(0, len(idx), members_per):
            chunk = idx[c:c + members_per]
            members.append(chunk + [-1] * (members_per - len(chunk)))
        for i in idx:
            lens[i] = n * block_size
    return members, lens
