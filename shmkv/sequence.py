"""Layer 1: `ActiveSequence`, a request's tokens cut into blocks, and the signals it sends.

A sequence holds the prompt plus generated tokens as `array('I')`, one sequence hash, local
hash and PLH per full block, and at most one trailing partial block. It never touches a
manager: it only produces `Use` / `Deref` / `Promote` signals (behavior.md §3).

Block layout of a sequence with block_size 4 and 10 tokens:

    tokens   t0 t1 t2 t3 | t4 t5 t6 t7 | t8 t9
    blocks   full[0]       full[1]       partial
    allocated watermark (num_allocated_tokens) counts tokens, not blocks.
"""

from __future__ import annotations

import random
from array import array
from collections.abc import Sequence

from shmkv.errors import ConfigError, SignalError
from shmkv.hashing import MAX_POSITION, local_hash_of_bytes, make_plh, sequence_hash, token_bytes
from shmkv.ids import SEQUENCE_DEFAULT_BLOCK_SIZE, LocalHash, Plh, SeqHash
from shmkv.signals import (
    Deref,
    FullBlock,
    MoveBlock,
    PartialBlock,
    Promote,
    RawBlock,
    UniqueBlock,
    Use,
)

_shared_rng = random.Random(0x5EED)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class ActiveSequence:
    """A request's token sequence and its block identities.

    Args:
        tokens: the prompt token ids (u32).
        max_output_tokens: generation stops after this many tokens (>= 1).
        block_size: tokens per block (>= 2; default 64, as in the seed).
        enable_prefix_caching: False gives every full block a random identity (nothing matches).
        emit_token_ids: attach per-block token ids to Use/Promote signals (only with caching).
        output_token_ids: planned output tokens; random u32 otherwise.
        rng: source of random tokens, partial ids and (caching off) random hashes.
    """

    __slots__ = (
        "_partial",
        "_rng",
        "block_size",
        "emit_token_ids",
        "enable_prefix_caching",
        "generated_tokens",
        "local_hashes",
        "max_output_tokens",
        "num_allocated_tokens",
        "num_input_tokens",
        "output_token_ids",
        "plhs",
        "seq_hashes",
        "tokens",
    )

    def __init__(
        self,
        tokens: Sequence[int] | array[int],
        max_output_tokens: int,
        block_size: int | None = None,
        enable_prefix_caching: bool = True,
        emit_token_ids: bool = False,
        output_token_ids: Sequence[int] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        bs = SEQUENCE_DEFAULT_BLOCK_SIZE if block_size is None else block_size
        if not _is_int(bs) or bs < 2:
            raise ConfigError(f"block_size must be an int >= 2, got {bs!r}")
        if max_output_tokens < 1:
            raise ConfigError(f"max_output_tokens must be >= 1, got {max_output_tokens}")
        if output_token_ids is not None and len(output_token_ids) < max_output_tokens:
            raise ConfigError("output_token_ids must hold at least max_output_tokens tokens")
        data = token_bytes(tokens)
        if not data:
            raise ConfigError("a request needs at least one prompt token")
        self.block_size = bs
        self.enable_prefix_caching = enable_prefix_caching
        self.emit_token_ids = emit_token_ids and enable_prefix_caching
        self.max_output_tokens = max_output_tokens
        self.output_token_ids = output_token_ids
        self._rng = _shared_rng if rng is None else rng
        self.tokens: array[int] = array("I")
        self.tokens.frombytes(data)
        self.num_input_tokens = len(self.tokens)
        self.generated_tokens = 0
        self.num_allocated_tokens = 0
        self.seq_hashes: list[SeqHash] = []
        self.local_hashes: list[LocalHash] = []
        self.plhs: list[Plh] = []
        self._partial: PartialBlock | None = None
        self._append_full_blocks(data, len(self.tokens) // bs)
        if len(self.tokens) % bs:
            self._partial = PartialBlock(self._rng.getrandbits(128))

    # ── identities ────────────────────────────────────────────────────────────────────────

    def _append_full_blocks(self, data: bytes | memoryview, count: int) -> None:
        """Hash `count` whole blocks from `data` (token bytes starting at a block boundary)."""
        step = self.block_size * 4
        view = memoryview(data)
        seqs, locs, plhs = self.seq_hashes, self.local_hashes, self.plhs
        if len(seqs) + count - 1 > MAX_POSITION:
            raise ConfigError(f"sequence longer than {MAX_POSITION + 1} blocks")
        if not self.enable_prefix_caching:
            rand = self._rng.getrandbits
            for _ in range(count):
                current = rand(64)
                seqs.append(current)
                plhs.append(make_plh(current, None, len(plhs)))
            return
        parent = seqs[-1] if seqs else None
        for i in range(count):
            local = local_hash_of_bytes(view[i * step : (i + 1) * step])
            current = sequence_hash(parent, local)
            locs.append(local)
            plhs.append(make_plh(current, parent, len(seqs)))
            seqs.append(current)
            parent = current

    @property
    def num_full_blocks(self) -> int:
        return len(self.seq_hashes)

    @property
    def partial_block(self) -> PartialBlock | None:
        return self._partial

    def unique_blocks(self) -> list[UniqueBlock]:
        """Full blocks then at most one partial block."""
        blocks: list[UniqueBlock] = [FullBlock(h) for h in self.seq_hashes]
        if self._partial is not None:
            blocks.append(self._partial)
        return blocks

    def positional_lineage_hashes(self) -> list[Plh]:
        return self.plhs

    def block_token_ids(self, index: int) -> list[int]:
        bs = self.block_size
        return self.tokens[index * bs : (index + 1) * bs].tolist()

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_unique_blocks(self) -> int:
        return len(self.seq_hashes) + (self._partial is not None)

    def current_known_blocks(self) -> int:
        return _ceil_div(len(self.tokens), self.block_size)

    def to_completion_blocks(self) -> int:
        return _ceil_div(self.num_input_tokens + self.max_output_tokens, self.block_size)

    def is_complete(self) -> bool:
        return self.generated_tokens >= self.max_output_tokens

    # ── allocation (prefill, chunked) ─────────────────────────────────────────────────────

    def prepare_allocation(self, cumulative_tokens: int) -> Use | None:
        """The Use covering blocks up to `cumulative_tokens`, beyond the committed watermark."""
        bs = self.block_size
        num_unique = self.num_unique_blocks
        to_cover = min(_ceil_div(cumulative_tokens, bs), num_unique)
        prev = min(_ceil_div(self.num_allocated_tokens, bs), num_unique)
        if to_cover <= prev:
            return None
        num_full = len(self.seq_hashes)
        full_end = min(to_cover, num_full)
        raw: list[RawBlock] = list(self.seq_hashes[prev:full_end])
        if to_cover > num_full and self._partial is not None:
            raw.append(self._partial)
        token_ids = (
            [self.block_token_ids(i) for i in range(prev, full_end)]
            if self.emit_token_ids
            else None
        )
        return Use.from_raw(
            raw,
            self.local_hashes[prev:full_end],
            self.plhs[prev:full_end],
            token_ids,
            FullBlock(self.seq_hashes[prev - 1]) if prev > 0 else None,
        )

    def commit_allocation(self, cumulative_tokens: int) -> None:
        if cumulative_tokens < 0 or cumulative_tokens > len(self.tokens):
            raise SignalError(
                f"commit_allocation({cumulative_tokens}) outside 0..{len(self.tokens)}"
            )
        self.num_allocated_tokens = cumulative_tokens

    def take_creation_signal(self) -> Use | None:
        signal = self.prepare_allocation(len(self.tokens))
        self.commit_allocation(len(self.tokens))
        return signal

    # ── decode ────────────────────────────────────────────────────────────────────────────

    def _next_token(self) -> int:
        planned = self.output_token_ids
        if planned is not None:
            return int(planned[self.generated_tokens])
        return self._rng.getrandbits(32)

    def generate(self) -> list[MoveBlock]:
        """Append one generated token; returns Promote/Use on a block boundary and the
        terminal Derefs (tail first) when the request completes."""
        promote = self.generate_token()
        signals: list[MoveBlock] = []
        if promote is not None:
            signals.append(promote)
        length = len(self.tokens)
        if length % self.block_size == 1:
            assert self._partial is not None
            signals.append(Use.from_raw([self._partial], (), (), None, None))
        if self.generated_tokens == self.max_output_tokens:
            self.num_allocated_tokens = length
            signals.extend(self.free_signal())
        return signals

    def generate_token(self) -> Promote | None:
        """Append one generated token (vLLM's dangling token): on a block boundary the full
        block is promoted (returned) and a new partial block is opened but NOT allocated;
        the next `prepare_allocation(len(self))` covers it."""
        if self.generated_tokens >= self.max_output_tokens:
            raise SignalError("generate() called on a completed sequence")
        self.tokens.append(self._next_token())
        self.generated_tokens += 1
        if len(self.tokens) % self.block_size != 1:
            return None
        promote = self._promote_partial() if self._partial is not None else None
        self._partial = PartialBlock(self._rng.getrandbits(128))
        return promote

    def _promote_partial(self) -> Promote:
        """The partial block just became full: give it its identity."""
        partial = self._partial
        assert partial is not None
        index = len(self.seq_hashes)
        bs = self.block_size
        parent = self.seq_hashes[-1] if self.seq_hashes else None
        block = self.tokens[index * bs : (index + 1) * bs]
        self._append_full_blocks(block.tobytes(), 1)
        self._partial = None
        return Promote(
            partial.partial_id,
            self.seq_hashes[-1],
            parent,
            self.local_hashes[-1] if self.enable_prefix_caching else 0,
            self.plhs[-1],
            block.tolist() if self.emit_token_ids else None,
        )

    def pop(self) -> None:
        """Undo the last generated token after a failed decode allocation."""
        if self.generated_tokens == 0:
            raise SignalError("pop() with no generated token")
        self.tokens.pop()
        self.generated_tokens -= 1
        if len(self.tokens) % self.block_size == 0:
            self._partial = None
        self.num_allocated_tokens = min(self.num_allocated_tokens, len(self.tokens))

    # ── release ───────────────────────────────────────────────────────────────────────────

    def free_signal(self) -> list[MoveBlock]:
        """Derefs, tail first, of the blocks covering the allocated tokens."""
        count = min(_ceil_div(self.num_allocated_tokens, self.block_size), self.num_unique_blocks)
        if count == 0:
            return []
        raw: list[RawBlock] = list(self.seq_hashes[:count])
        if count > len(self.seq_hashes) and self._partial is not None:
            raw.append(self._partial)
        raw.reverse()
        return [Deref.from_raw(raw)]

    def reset_with_signal(self) -> list[MoveBlock]:
        """Preemption: free the allocated blocks, keep the generated tokens for recompute."""
        signals = self.free_signal()
        self.num_allocated_tokens = 0
        return signals
