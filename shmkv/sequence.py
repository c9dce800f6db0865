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
import sys
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Final

from shmkv import hashing
from shmkv.errors import ConfigError, InvariantError, SignalError
from shmkv.hashing import (
    MAX_POSITION,
    BlockHashes,
    hash_block,
    hash_blocks,
    make_plh,
    token_bytes,
)
from shmkv.ids import SEQUENCE_DEFAULT_BLOCK_SIZE, LocalHash, PartialId, Plh, SeqHash
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
# NOTE: Final: compiled (mypyc), Final module names are C statics, not dict lookups per use.
_consume: Final = deque[None](maxlen=0).extend
_array_append: Final = array.append
_array_frombytes: Final = array.frombytes
_array_tobytes: Final = array.tobytes
_BIG_ENDIAN: Final = sys.byteorder == "big"
_int_from_bytes: Final = int.from_bytes
_TOKEN_BYTES: Final = 4
_FAST_HASH_END: Final = 255
"""Below this block position a block's hashes come from the accelerator's `hash_one_at`."""
# The C helpers of shmkv/_blockhash.c while the core runs compiled (else None: Python).
# NOTE: the accelerator reads the token array's memory, whose words are little-endian only on
# a little-endian machine.
_HASH_ONE_AT: Final[Any] = None if _BIG_ENDIAN else hashing.ACCEL_HASH_ONE_AT
_CROSSING_WORDS: Final[Any] = hashing.ACCEL_CROSSING_WORDS
_EXTEND_STRIDED: Final[Any] = hashing.ACCEL_EXTEND_STRIDED


def _random_bytes(rng: random.Random, count: int) -> bytes:
    """`rng.randbytes(count)`, without its interpreted frame: `random.Random.randbytes` is
    `getrandbits(count * 8).to_bytes(count, "little")` (CPython's random.py)."""
    return rng.getrandbits(count * 8).to_bytes(count, "little")


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
        block_hashes: the prompt's full-block identities, already computed by the caller (a
            router that hashed the prompt to route it); ignored with prefix caching off.
    """

    __slots__ = (
        "_partial",
        "_rng",
        "block_size",
        "emit_token_ids",
        "enable_prefix_caching",
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
        *,
        block_hashes: BlockHashes | None = None,
        token_data: bytes | None = None,
        own_hashes: bool = False,
    ) -> None:
        """`token_data`: `token_bytes(tokens)` if the caller has it already (it vouches for it);
        `own_hashes`: `block_hashes`' lists are the caller's to give away (fresh from
        `PrefixHashCache.hash_blocks`): the sequence keeps them instead of copies."""
        bs = SEQUENCE_DEFAULT_BLOCK_SIZE if block_size is None else block_size
        if not _is_int(bs) or bs < 2:
            raise ConfigError(f"block_size must be an int >= 2, got {bs!r}")
        if max_output_tokens < 1:
            raise ConfigError(f"max_output_tokens must be >= 1, got {max_output_tokens}")
        if output_token_ids is not None and len(output_token_ids) < max_output_tokens:
            raise ConfigError("output_token_ids must hold at least max_output_tokens tokens")
        data = token_bytes(tokens) if token_data is None else token_data
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
        num_tokens = len(self.tokens)
        self.num_input_tokens = num_tokens
        self.num_allocated_tokens = 0
        num_full = num_tokens // bs
        if num_full - 1 > MAX_POSITION:
            raise ConfigError(f"sequence longer than {MAX_POSITION + 1} blocks")
        if not enable_prefix_caching:
            self.local_hashes: list[LocalHash] = []
            self.seq_hashes: list[SeqHash] = []
            self.plhs: list[Plh] = []
            rand = self._rng.getrandbits
            for position in range(num_full):
                current = rand(64)
                self.seq_hashes.append(current)
                self.plhs.append(make_plh(current, None, position))
        else:
            if block_hashes is None:
                block_hashes = hash_blocks(data, bs)
            elif not (
                len(block_hashes.seq_hashes)
                == len(block_hashes.local_hashes)
                == len(block_hashes.plhs)
                == num_full
            ):
                raise ConfigError(f"block_hashes must describe the prompt's {num_full} full blocks")
            if own_hashes:  # the caller's fresh lists: kept, not copied
                self.local_hashes = block_hashes.local_hashes
                self.seq_hashes = block_hashes.seq_hashes
                self.plhs = block_hashes.plhs
            else:
                self.local_hashes = list(block_hashes.local_hashes)
                self.seq_hashes = list(block_hashes.seq_hashes)
                self.plhs = list(block_hashes.plhs)
        self._partial: PartialBlock | None = None
        if num_tokens % bs:
            self._partial = PartialBlock(self._rng.getrandbits(128))

    # ── identities ────────────────────────────────────────────────────────────────────────

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

    @property
    def generated_tokens(self) -> int:
        """Tokens generated so far (kept across preemption)."""
        return len(self.tokens) - self.num_input_tokens

    def is_complete(self) -> bool:
        return len(self.tokens) - self.num_input_tokens >= self.max_output_tokens

    # ── allocation (prefill, chunked) ─────────────────────────────────────────────────────

    def prepare_allocation(self, cumulative_tokens: int) -> Use | None:
        """The Use covering blocks up to `cumulative_tokens`, beyond the committed watermark."""
        bs = self.block_size
        num_full = len(self.seq_hashes)
        num_unique = num_full + (self._partial is not None)
        to_cover = min(-(-cumulative_tokens // bs), num_unique)
        prev = min(-(-self.num_allocated_tokens // bs), num_unique)
        if to_cover <= prev:
            return None
        full_end = min(to_cover, num_full)
        # NOTE: the slice is a new list already (list[int] is not a list[RawBlock] to mypy).
        raw: list[RawBlock] = self.seq_hashes[prev:full_end]  # type: ignore[assignment]
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
            full_end - prev,
            # the PLHs chain the sequence hashes from position `prev` (prefix caching off,
            # each is a root's: no hint)
            prev if self.enable_prefix_caching else -1,
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
            signals.append(Use.from_raw([self._partial], (), (), None, None, 0))
        if length - self.num_input_tokens == self.max_output_tokens:
            self.num_allocated_tokens = length
            signals.extend(self.free_signal())
        return signals

    def generate_token(self, draw: Callable[[int], int] | None = None) -> Promote | None:
        """Append one generated token (vLLM's dangling token): on a block boundary the full
        block is promoted (returned) and a new partial block is opened but NOT allocated;
        the next `prepare_allocation(len(self))` covers it.

        `draw(bits)` replaces the sequence's `rng.getrandbits` (a caller drawing the
        randomness of many sequences at once, see `RandomWords`); it is called for
        `next_token_words()` 32-bit words in all."""
        tokens = self.tokens
        generated = len(tokens) - self.num_input_tokens
        if generated >= self.max_output_tokens:
            raise SignalError("generate() called on a completed sequence")
        getrandbits = self._rng.getrandbits if draw is None else draw
        planned = self.output_token_ids
        tokens.append(getrandbits(32) if planned is None else int(planned[generated]))
        if len(tokens) % self.block_size != 1:
            return None
        promote = self._promote_partial(getrandbits) if self._partial is not None else None
        self._partial = PartialBlock(getrandbits(128))
        return promote

    def open_block(self, partial_id: PartialId) -> Promote | None:
        """The rest of `generate_token` once its token is appended (by `append_crossing_tokens`)
        and opens a new block: promote the full partial block (returned) and open a partial
        block `partial_id`. Prefix caching on only (no random block hash to draw)."""
        if len(self.tokens) % self.block_size != 1 or not self.enable_prefix_caching:
            raise SignalError(
                "open_block() needs a caching sequence whose last token opens a block"
            )
        partial = self._partial
        promote = None if partial is None else self._promote_hashed(partial.partial_id)
        self._partial = PartialBlock(partial_id)
        return promote

    def next_token_words(self) -> int:
        """How many 32-bit random words the next `generate_token()` draws: one for a random
        token, and on a block boundary two for a random block hash (prefix caching off) and
        four for the new partial block's id."""
        words = 1 if self.output_token_ids is None else 0
        if (len(self.tokens) + 1) % self.block_size == 1:
            if self._partial is not None and not self.enable_prefix_caching:
                words += 2
            words += 4
        return words

    def cross_block(self, partial_id: PartialId) -> PartialId | None:
        """`open_block` without building the Promote (the decode crossing's path): returns
        the id of the partial block it promoted (None: there was none). That Promote's other
        fields are then the last entries of `seq_hashes`, `local_hashes` and `plhs`, the
        parent the entry before (None at position 0), the lineage position
        `len(seq_hashes) - 1` and no token ids: a sequence emitting token ids must use
        `open_block`."""
        if (
            len(self.tokens) % self.block_size != 1
            or not self.enable_prefix_caching
            or self.emit_token_ids
        ):
            raise SignalError(
                "cross_block() needs a caching sequence without token ids whose last token "
                "opens a block"
            )
        partial = self._partial
        if partial is None:
            self._partial = PartialBlock(partial_id)
            return None
        self._hash_full_block()
        self._partial = PartialBlock(partial_id)
        return partial.partial_id

    def _promote_hashed(self, partial_id: PartialId) -> Promote:
        """`_promote_partial` of the partial block `partial_id` with prefix caching on (its
        identity hashes its tokens), without the caching-off branches: the decode crossing's
        path (`open_block`)."""
        block_ids = self._hash_full_block()
        seqs = self.seq_hashes
        index = len(seqs) - 1
        return Promote(
            partial_id,
            seqs[index],
            seqs[index - 1] if index else None,
            self.local_hashes[index],
            self.plhs[index],
            block_ids,
            index,
        )

    def _hash_full_block(self) -> list[int] | None:
        """Hash the partial block that just filled (prefix caching on) and append its hashes;
        the partial block is gone. Returns its token ids when the sequence emits them."""
        # Lists and tuple of Any: compiled, the hashes pass through boxed (no int conversions).
        seqs: list[Any] = self.seq_hashes
        index = len(seqs)
        if index > MAX_POSITION:
            raise ConfigError(f"sequence longer than {MAX_POSITION + 1} blocks")
        bs = self.block_size
        start = index * bs
        parent: Any = seqs[index - 1] if index else None
        hash_one_at: Any = _HASH_ONE_AT
        if hash_one_at is not None and index < _FAST_HASH_END and not self.emit_token_ids:
            # the block hashed in place in the token array: no slice, no bytes copy
            # NOTE: declared and unpacked here: compiled, a tuple variable shared by both
            # branches is rebuilt as a tuple to be unpacked or indexed
            hashed: tuple[Any, Any, Any] = hash_one_at(
                self.tokens, start * _TOKEN_BYTES, bs * _TOKEN_BYTES, parent, index
            )
            local, current, plh = hashed
            block_ids = None
        else:
            block = self.tokens[start : start + bs]
            local, current, plh = hash_block(
                token_bytes(block) if _BIG_ENDIAN else _array_tobytes(block), parent, index
            )
            block_ids = block.tolist() if self.emit_token_ids else None
        local_hashes: list[Any] = self.local_hashes
        plhs: list[Any] = self.plhs
        local_hashes.append(local)
        seqs.append(current)
        plhs.append(plh)
        self._partial = None
        return block_ids

    def _promote_partial(self, getrandbits: Callable[[int], int] | None) -> Promote:
        """The partial block just became full: give it its identity (`getrandbits`: the
        source of a random one, prefix caching off)."""
        partial = self._partial
        assert partial is not None
        if self.enable_prefix_caching:
            return self._promote_hashed(partial.partial_id)
        seqs = self.seq_hashes
        index = len(seqs)
        if index > MAX_POSITION:
            raise ConfigError(f"sequence longer than {MAX_POSITION + 1} blocks")
        if getrandbits is None:
            raise InvariantError("a sequence with prefix caching off needs random bits")
        parent = seqs[-1] if seqs else None
        current = getrandbits(64)
        plh = make_plh(current, None, index)
        seqs.append(current)
        self.plhs.append(plh)
        self._partial = None
        # emit_token_ids is off with caching off: no token ids
        return Promote(partial.partial_id, current, parent, 0, plh, None, -1)

    def pop(self) -> None:
        """Undo the last generated token after a failed decode allocation."""
        if len(self.tokens) == self.num_input_tokens:
            raise SignalError("pop() with no generated token")
        self.tokens.pop()
        if len(self.tokens) % self.block_size == 0:
            self._partial = None
        self.num_allocated_tokens = min(self.num_allocated_tokens, len(self.tokens))

    # ── release ───────────────────────────────────────────────────────────────────────────

    def free_signal(self) -> list[MoveBlock]:
        """Derefs, tail first, of the blocks covering the allocated tokens."""
        count = min(_ceil_div(self.num_allocated_tokens, self.block_size), self.num_unique_blocks)
        if count == 0:
            return []
        raw: list[RawBlock] = self.seq_hashes[:count]  # type: ignore[assignment]
        if count > len(self.seq_hashes) and self._partial is not None:
            raw.append(self._partial)
        raw.reverse()
        return [Deref.from_raw(raw)]

    def reset_with_signal(self) -> list[MoveBlock]:
        """Preemption: free the allocated blocks, keep the generated tokens for recompute."""
        signals = self.free_signal()
        self.num_allocated_tokens = 0
        return signals


def random_words(rng: random.Random, count: int) -> array[int]:
    """The next `count` 32-bit words of `rng`, as `count` calls of `getrandbits(32)` would
    return them, in one call."""
    words = array("I")
    extend_random_words(words, rng, count)
    return words


class RandomWords:
    """`count` 32-bit words drawn from `rng` in one call, handed out in order.

    Interchangeable with the draws it replaces: `getrandbits(k)` (k a multiple of 32)
    returns what `rng.getrandbits(k)` would have returned at that point of the stream, and
    `take(n)` the next n words as `n` calls of `getrandbits(32)` would. The caller must
    consume exactly `count` words (`remaining` tells).
    """

    __slots__ = ("_position", "_words")

    def __init__(self, rng: random.Random, count: int) -> None:
        self._words = random_words(rng, count)
        self._position = 0

    @property
    def remaining(self) -> int:
        return len(self._words) - self._position

    def take(self, count: int) -> array[int]:
        start = self._position
        if start + count > len(self._words):
            raise SignalError("RandomWords: drew more words than were reserved")
        self._position = start + count
        return self._words[start : start + count]

    def getrandbits(self, bits: int) -> int:
        start = self._position
        end = start + (bits >> 5)
        if bits & 31 or end > len(self._words):
            raise SignalError(f"RandomWords: cannot serve {bits} more bits")
        self._position = end
        if end == start + 1:
            return self._words[start]
        if _BIG_ENDIAN:  # pragma: no cover
            return sum(w << (32 * i) for i, w in enumerate(self._words[start:end]))
        return int.from_bytes(self._words[start:end].tobytes(), "little")


def append_tokens(token_arrays: Sequence[array[int]], tokens: Sequence[int]) -> None:
    """Bulk decode step: append `tokens[i]` to `token_arrays[i]` (one C-level pass).

    Only for sequences whose new token neither crosses a block boundary (`len % block_size`
    stays != 1) nor completes them (the caller guarantees it), or that finish the step with
    `open_block` (`append_crossing_tokens`)."""
    _consume(map(_array_append, token_arrays, tokens))


def append_crossing_tokens(
    token_arrays: Sequence[array[int]], positions: Sequence[int], rng: random.Random
) -> list[PartialId]:
    """`append_random_tokens` where the sequences at `positions` (ascending) open a new block
    with their token: each of those draws, right after its token, the 128-bit id of its new
    partial block (four words, as `generate_token` with prefix caching on). Returns those ids,
    in order; the caller finishes each of those sequences' step with `open_block(id)`."""
    if not positions:
        append_random_tokens(token_arrays, rng)
        return []
    words = array("I")
    partial_ids = extend_crossing_words(words, len(token_arrays), list(positions), rng)
    append_tokens(token_arrays, words)
    return partial_ids


def extend_strided(dest: array[int], src: array[int], start: int, step: int) -> None:
    """`dest.extend(src[start::step])` (two `array('I')`s), without the strided slice when the
    accelerator is there: a sequence takes its tokens out of a bulk draw."""
    extend: Any = _EXTEND_STRIDED
    if extend is not None:
        extend(dest, src, start, step)
        return
    dest.extend(src[start::step])


def extend_random_words(words: array[int], rng: random.Random, count: int) -> None:
    """Append to `words` the next `count` 32-bit words of `rng` (`random_words`, in place)."""
    crossing_words: Any = _CROSSING_WORDS
    if crossing_words is not None:  # the same draw in C
        drawn: tuple[bytes, list[PartialId]] = crossing_words(rng, count, [], 0)
        _extend_words(words, drawn[0])
        return
    _extend_words(words, _random_bytes(rng, 4 * count))


def extend_crossing_words(
    words: array[int],
    num_tokens: int,
    positions: list[int],
    rng: random.Random,
    offset: int = 0,
) -> list[PartialId]:
    """One bulk decode step of `num_tokens` sequences, those at `offset + positions`
    (ascending) opening a new block with their token: draws what their `generate_token` calls
    would draw one by one in that order (a token word each; right after a crossing one's
    token, the four words of its new partial block's id), appends the `num_tokens` tokens to
    `words` in order and returns the ids in order. Prefix caching on (no random block hash is
    drawn).

    Raises:
        SignalError: the positions do not ascend within `0 <= offset + position <
            num_tokens` (nothing is drawn).
    """
    previous = 0
    for position in positions:
        if position < previous or offset + position >= num_tokens or offset < 0:
            raise SignalError(
                f"extend_crossing_words: position {position} out of order or beyond "
                f"{num_tokens - offset} tokens"
            )
        previous = position
    crossing_words: Any = _CROSSING_WORDS
    if crossing_words is not None:  # the same draw and cuts in C
        drawn: tuple[bytes, list[PartialId]] = crossing_words(rng, num_tokens, positions, offset)
        _extend_words(words, drawn[0])
        return drawn[1]
    data = _random_bytes(rng, 4 * (num_tokens + 4 * len(positions)))
    partial_ids: list[PartialId] = []
    start = 0
    # Crossing j's token is word `offset + position + 4 j`, its id the four words after it:
    # the id's bytes start at `4 (offset + position + 1) + 16 j`.
    shift = 4 * (offset + 1)
    for position in positions:
        end = 4 * position + shift
        _extend_words(words, data[start:end])
        start = end + 16
        partial_ids.append(_int_from_bytes(data[end:start], "little"))
        shift += 16
    _extend_words(words, data[start:])
    return partial_ids


def _extend_words(words: array[int], data: bytes) -> None:
    """Append the little-endian 32-bit words `data` to `words`."""
    if _BIG_ENDIAN:  # pragma: no cover - randbytes packs the 32-bit words little-endian
        more = array("I")
        more.frombytes(data)
        more.byteswap()
        words.extend(more)
        return
    _array_frombytes(words, data)


def append_random_tokens(token_arrays: Sequence[array[int]], rng: random.Random) -> None:
    """`append_tokens` with one random token each, drawn from `rng` exactly as one
    `generate_token()` per sequence in that order would (one 32-bit word each)."""
    count = len(token_arrays)
    if count == 1:
        token_arrays[0].append(rng.getrandbits(32))
        return
    append_tokens(token_arrays, random_words(rng, count))
