"""LMCache multiprocess (MP) wire protocol, as spoken by LMCache 0.5.6 servers.

Pinned assumptions (history in ``shared/docs/lmcache-mp-protocol.md`` section 12):

* target LMCache >= 0.5.6: integer op ids are frozen there (``LEGACY_OPERATION_IDS``);
  0.5.5 shares the ids but not the lmcache-driven registration; 0.5.4 and older lack
  ``num_kv_readers`` and their lookups are silently dropped by newer servers;
* a request is ``[msgpack(uid), msgpack(op), msgpack(arg)...]`` with every declared
  argument present; a reply echoes the uid and op frames byte for byte and carries a
  third frame only when the result is not ``None``;
* no version is negotiated and the server never sends an error: a bad request is simply
  never answered, so every call carries a deadline.

Every reply is decoded with a typed decoder built once per operation; anything else is a
:class:`~kvconn_plugin.errors.KVConnProtocolError` for that call only.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec

from kvconn_plugin.errors import KVConnProtocolError

# Token ids travel as uint32 on the server's hash path; larger ids make it drop the call.
MAX_TOKEN_ID = 2**32 - 1
MAX_CACHE_SALT_LEN = 128
_FORBIDDEN_SALT_CHARS = frozenset("@/\\\x00")

NonNeg = Annotated[int, msgspec.Meta(ge=0)]
Positive = Annotated[int, msgspec.Meta(gt=0)]


class Op(enum.IntEnum):
    """Operation ids frozen in LMCache 0.5.6 (``wire.py`` LEGACY_OPERATION_IDS)."""

    STORE = 6
    RETRIEVE = 7
    LOOKUP = 8
    QUERY_PREFETCH_STATUS = 9
    FREE_LOOKUP_LOCKS = 12
    END_SESSION = 13
    REGISTER_ENGINE_DRIVEN = 14
    UNREGISTER_ENGINE_DRIVEN = 15
    PREPARE_STORE = 16
    COMMIT_STORE = 17
    PREPARE_RETRIEVE = 18
    COMMIT_RETRIEVE = 19
    CLEAR = 20
    GET_CHUNK_SIZE = 21
    PING = 22
    REPORT_BLOCK_ALLOCATION = 23
    NOOP = 24
    GET_EXPERIMENTAL = 32


# ---------------------------------------------------------------------------------------
# Request structs. msgspec Structs encode as maps keyed by field name, which is what the
# server's dataclass decoders expect; field order follows the server's declarations.
# ---------------------------------------------------------------------------------------


class CacheKey(msgspec.Struct, kw_only=True):
    """``IPCCacheServerKey``: the key of every lookup, store and retrieve call."""

    model_name: str
    world_size: int
    worker_id: int | None
    token_ids: list[int]
    start: int
    end: int
    request_id: str
    cache_salt: str = ""
    request_configs: dict[str, Any] | None = None
    num_kv_readers: int = 1


class RegisterEngineDrivenPayload(msgspec.Struct, kw_only=True):
    """``RegisterEngineDrivenContextPayload`` (op 14)."""

    instance_id: int
    model_name: str
    world_size: int
    block_size: int
    num_layers: int
    hidden_dim_size: int
    dtype_str: str
    use_mla: bool
    num_physical_slots: int | None = None


class BlockAllocationRecord(msgspec.Struct, kw_only=True):
    req_id: str
    new_block_ids: list[int]
    new_token_ids: list[int]


# ---------------------------------------------------------------------------------------
# Reply structs. Unknown keys are ignored (newer servers add fields last, with defaults);
# types and value ranges are enforced.
# ---------------------------------------------------------------------------------------


class RegisterEngineDrivenReply(msgspec.Struct):
    shm_name: str = ""
    pool_size: NonNeg = 0


class SlotDescriptor(msgspec.Struct):
    """One chunk's place in the server's SHM pool. Bounds are checked by ``ShmPool``."""

    offset: NonNeg
    length: Positive
    shape: list[Positive]
    dtype: str


class TransferContext(msgspec.Struct):
    slots: list[SlotDescriptor] = []
    chunk_indices: list[NonNeg] = []


class PrepareStoreReply(msgspec.Struct):
    context: TransferContext = msgspec.field(default_factory=TransferContext)

    def __post_init__(self) -> None:
        # Slot k is for chunk chunk_indices[k]; a length mismatch or a repeated chunk
        # would make the worker write the wrong chunk (msgspec turns this into a
        # ValidationError, i.e. a protocol error for this call).
        ctx = self.context
        if len(ctx.slots) != len(ctx.chunk_indices):
            raise ValueError(
                f"{len(ctx.slots)} slots for {len(ctx.chunk_indices)} chunk indices"
            )
        if len(set(ctx.chunk_indices)) != len(ctx.chunk_indices):
            raise ValueError("repeated chunk index")


class PrepareRetrieveReply(msgspec.Struct):
    success: bool
    data: bytes = b""
    context: TransferContext = msgspec.field(default_factory=TransferContext)


@dataclass(frozen=True)
class OpSpec:
    """How many argument frames an op takes and how its reply is decoded."""

    nargs: int
    reply: Any  # a type for msgspec, or None when the reply has no body

    def decoder(self) -> msgspec.msgpack.Decoder | None:
        return None if self.reply is None else msgspec.msgpack.Decoder(self.reply)


OP_SPECS: dict[Op, OpSpec] = {
    Op.LOOKUP: OpSpec(2, None),
    Op.QUERY_PREFETCH_STATUS: OpSpec(1, NonNeg),  # a missing body means "still running"
    Op.FREE_LOOKUP_LOCKS: OpSpec(2, None),
    Op.END_SESSION: OpSpec(1, None),
    Op.REGISTER_ENGINE_DRIVEN: OpSpec(1, RegisterEngineDrivenReply),
    Op.UNREGISTER_ENGINE_DRIVEN: OpSpec(1, None),
    Op.PREPARE_STORE: OpSpec(2, PrepareStoreReply),
    Op.COMMIT_STORE: OpSpec(3, bool),
    Op.PREPARE_RETRIEVE: OpSpec(2, PrepareRetrieveReply),
    Op.COMMIT_RETRIEVE: OpSpec(2, bool),
    Op.CLEAR: OpSpec(1, None),
    Op.GET_CHUNK_SIZE: OpSpec(0, Positive),
    Op.PING: OpSpec(1, bool),
    Op.REPORT_BLOCK_ALLOCATION: OpSpec(3, None),
    Op.NOOP: OpSpec(0, str),
    Op.GET_EXPERIMENTAL: OpSpec(0, list[str]),
}

# Ops whose reply may legitimately have no body even though they declare a type.
OPTIONAL_BODY = frozenset({Op.QUERY_PREFETCH_STATUS})

_encoder = msgspec.msgpack.Encoder()
_DECODERS: dict[Op, msgspec.msgpack.Decoder | None] = {
    op: s.decoder() for op, s in OP_SPECS.items()
}


def encode_request(uid: int, op: Op, args: tuple[Any, ...]) -> list[bytes]:
    """Build the frames of one request; raises ``ValueError`` for a wrong argument count.

    The server drops requests with a wrong count, and one with fewer than two frames kills
    its receive thread for good, so the count is checked here rather than trusted.
    """
    spec = OP_SPECS[op]
    if len(args) != spec.nargs:
        raise ValueError(f"{op.name} takes {spec.nargs} arguments, got {len(args)}")
    return [_encoder.encode(uid), _encoder.encode(int(op)), *(_encoder.encode(a) for a in args)]


def decode_reply(op: Op, body: bytes | None) -> Any:
    """Decode one reply body for ``op``; ``None`` body means the result is ``None``."""
    decoder = _DECODERS[op]
    if body is None:
        if decoder is None or op in OPTIONAL_BODY:
            return None
        raise KVConnProtocolError(f"{op.name}: reply has no body, expected {OP_SPECS[op].reply}")
    if decoder is None:
        # A body for a body-less op is tolerated only if it is msgpack nil.
        if body == b"\xc0":
            return None
        raise KVConnProtocolError(f"{op.name}: unexpected reply body ({len(body)} bytes)")
    try:
        return decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise KVConnProtocolError(f"{op.name}: malformed reply: {exc}") from exc
    except (RecursionError, MemoryError, ValueError, TypeError, OverflowError) as exc:
        # Deeply nested unknown fields make msgspec recurse until RecursionError; that
        # must stay a per-call protocol error, never escape into the I/O thread.
        raise KVConnProtocolError(f"{op.name}: undecodable reply: {exc!r}") from exc


def validate_key(key: CacheKey, chunk_size: int) -> None:
    """Reject keys the server would silently drop (it answers nothing on these)."""
    if key.start % chunk_size or key.end % chunk_size:
        raise ValueError(f"start/end ({key.start}, {key.end}) not multiples of {chunk_size}")
    if not 0 <= key.start <= key.end:
        raise ValueError(f"bad range [{key.start}, {key.end})")
    if key.num_kv_readers < 1:
        raise ValueError("num_kv_readers must be >= 1")
    validate_cache_salt(key.cache_salt)


def validate_cache_salt(salt: str) -> None:
    if len(salt) > MAX_CACHE_SALT_LEN or _FORBIDDEN_SALT_CHARS.intersection(salt):
        raise ValueError(
            f"cache_salt must be at most {MAX_CACHE_SALT_LEN} characters "
            "without '@', '/', '\\' or NUL"
        )
