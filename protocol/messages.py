"""Message schemas of the DynaMO-RL wire protocol.

Guarantees:
- Every message is a frozen, slotted dataclass whose fields are declared together with their
  wire spec (type, range, maximum length, numpy dtype); that one table drives validation here
  and encoding in `protocol.codec`.
- A message object exists only if it passed validation: construction runs every field spec and
  then the message's cross-field invariants, raising a `ProtocolError` subclass naming the
  message type and field. Numpy arrays are not frozen: mutating one after construction is the
  caller's responsibility (and decoded arrays are read-only views of the received frames).
- Wire type names (`TYPE`) are stable and independent of Python class names.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, NamedTuple, TypeVar

import numpy as np

from protocol.errors import ArrayMismatch, FieldTypeError, InvalidValue

PROTOCOL_VERSION = 3  # 2: grant MACs, learner sessions and receipts; 3: restarts settled by id

# A behaviour log-prob may round to slightly above 0 in float32 (p == 1 after temperature).
LOGPROB_EPS = 1e-4

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
ID_LEN = 256  # actor ids, problem ids, verifier names
TEXT_LEN = 1 << 20  # prompts and reference answers, in characters
RESUMED_LEN = 1 << 22  # ints of a checkpoint's id ranges (2 per range: 2M holes)
LIST_LEN = 1 << 16  # in-flight grant ids, tensors of one weight announce
MAX_TOKENS = 1 << 24  # tokens in one group: 16M x 12 bytes stays under the 256 MiB message cap
MAX_SAMPLES = 4096  # samples per prompt (the paper's n_max is 24)
MAX_CHUNK_BYTES = 1 << 27


def describe_array(a: np.ndarray) -> str:
    """`float32[999]`-style description used in error messages."""
    return f"{a.dtype.name}[{','.join(map(str, a.shape))}]"


# ---------------------------------------------------------------- field specs


class Spec:
    """How one field is typed and bounded. `check` returns the (possibly normalised) value."""

    out_of_band: ClassVar[bool] = False  # True: travels as its own frame, not in the header

    def check(self, v: Any, t: str, name: str) -> Any:
        raise NotImplementedError


def _type_error(t: str, name: str, expected: str, v: Any) -> FieldTypeError:
    return FieldTypeError(f"expected {expected}, got {type(v).__name__}", msg_type=t, field=name)


@dataclass(frozen=True, slots=True)
class Int(Spec):
    lo: int = _INT64_MIN
    hi: int = _INT64_MAX

    def check(self, v: Any, t: str, name: str) -> int:
        if type(v) is not int:
            # numpy integers are welcome; bool is an int subclass but never a valid count
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise _type_error(t, name, "int", v)
            v = int(v)
        if not self.lo <= v <= self.hi:
            raise InvalidValue(f"expected int in [{self.lo}, {self.hi}], got {v}", msg_type=t,
                               field=name)
        return v


@dataclass(frozen=True, slots=True)
class Float(Spec):
    lo: float = -math.inf
    hi: float = math.inf

    def check(self, v: Any, t: str, name: str) -> float:
        if type(v) is not float:
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise _type_error(t, name, "float", v)
            v = float(v)
        if not (math.isfinite(v) and self.lo <= v <= self.hi):
            raise InvalidValue(f"expected finite float in [{self.lo}, {self.hi}], got {v}",
                               msg_type=t, field=name)
        return v


@dataclass(frozen=True, slots=True)
class Bool(Spec):
    def check(self, v: Any, t: str, name: str) -> bool:
        if type(v) is not bool:
            raise _type_error(t, name, "bool", v)
        return v


@dataclass(frozen=True, slots=True)
class Str(Spec):
    max_len: int
    min_len: int = 0
    pattern: str | None = None

    def check(self, v: Any, t: str, name: str) -> str:
        if type(v) is not str:
            raise _type_error(t, name, "str", v)
        if not self.min_len <= len(v) <= self.max_len:
            raise InvalidValue(f"expected str of {self.min_len}..{self.max_len} characters, "
                               f"got {len(v)}", msg_type=t, field=name)
        if self.pattern is not None and re.fullmatch(self.pattern, v) is None:
            raise InvalidValue(f"expected str matching {self.pattern!r}, got {v[:80]!r}",
                               msg_type=t, field=name)
        return v


@dataclass(frozen=True, slots=True)
class ListOf(Spec):
    item: Spec
    max_len: int

    def check(self, v: Any, t: str, name: str) -> list[Any]:
        if not isinstance(v, list | tuple):
            raise _type_error(t, name, "list", v)
        if len(v) > self.max_len:
            raise InvalidValue(f"expected at most {self.max_len} items, got {len(v)}", msg_type=t,
                               field=name)
        return [self.item.check(x, t, f"{name}[{i}]") for i, x in enumerate(v)]


@dataclass(frozen=True, slots=True)
class Record(Spec):
    """A fixed-arity NamedTuple; travels as a msgpack array in field order."""

    cls: type[tuple[Any, ...]]
    items: tuple[Spec, ...]

    def check(self, v: Any, t: str, name: str) -> tuple[Any, ...]:
        if not isinstance(v, list | tuple) or len(v) != len(self.items):
            raise _type_error(t, name, f"{self.cls.__name__} of {len(self.items)} items", v)
        names: tuple[str, ...] = self.cls._fields  # type: ignore[attr-defined]
        return self.cls(*(s.check(x, t, f"{name}.{n}") for s, x, n in zip(
            self.items, v, names, strict=True)))


@dataclass(frozen=True, slots=True)
class Array(Spec):
    """A 1-D numpy array of exactly `dtype` (little-endian on the wire), sent as its own frame."""

    dtype: np.dtype[Any]
    max_len: int
    out_of_band: ClassVar[bool] = True

    def check(self, v: Any, t: str, name: str) -> np.ndarray:
        if not isinstance(v, np.ndarray):
            raise _type_error(t, name, f"numpy array of {self.dtype.name}", v)
        # `is` first: native dtypes are singletons, and this runs for every array received.
        if (v.dtype is not self.dtype and v.dtype != self.dtype) or v.ndim != 1:
            same_name = v.dtype.name == self.dtype.name and v.dtype != self.dtype
            got = f"dtype {v.dtype.str}" if same_name else describe_array(v)
            raise ArrayMismatch(f"expected 1-D {self.dtype.name} ({self.dtype.str}), got {got}",
                                msg_type=t, field=name)
        if v.size > self.max_len:
            raise ArrayMismatch(f"expected at most {self.max_len} elements, got {v.size}",
                                msg_type=t, field=name)
        # Decoded bool arrays are raw bytes: anything but 0/1 is not a bool.
        if v.dtype.kind == "b" and v.size and v.view(np.uint8).max() > 1:
            raise InvalidValue("bool array holds bytes other than 0 and 1", msg_type=t, field=name)
        return v


@dataclass(frozen=True, slots=True)
class Bytes(Spec):
    """A bytes-like payload sent as its own frame (decoded as a read-only memoryview)."""

    max_len: int
    out_of_band: ClassVar[bool] = True

    def check(self, v: Any, t: str, name: str) -> bytes | bytearray | memoryview:
        if not isinstance(v, bytes | bytearray | memoryview):
            raise _type_error(t, name, "bytes-like", v)
        if isinstance(v, memoryview) and not v.c_contiguous:
            raise FieldTypeError("expected a contiguous buffer", msg_type=t, field=name)
        n = v.nbytes if isinstance(v, memoryview) else len(v)
        if n > self.max_len:
            raise InvalidValue(f"expected at most {self.max_len} bytes, got {n}", msg_type=t,
                               field=name)
        return v


def wire(spec: Spec, **default: Any) -> Any:
    """Declare a dataclass field together with its wire spec; `default=` or
    `default_factory=` make it optional in constructors (it always travels on the wire)."""
    return field(metadata={"spec": spec}, **default)


# ---------------------------------------------------------------- message base

MESSAGE_TYPES: dict[str, type[Message]] = {}


class Message:
    """Base of all messages: validation on construction, value equality (arrays by content)."""

    __slots__ = ()
    TYPE: ClassVar[str]
    SCHEMA: ClassVar[tuple[tuple[str, Spec], ...]]

    def __post_init__(self) -> None:
        t = self.TYPE
        for name, spec in self.SCHEMA:
            v = getattr(self, name)
            nv = spec.check(v, t, name)
            if nv is not v:
                object.__setattr__(self, name, nv)
        self._check()

    def _check(self) -> None:
        """Cross-field invariants; overridden where a message has any."""

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        for name, spec in self.SCHEMA:
            a, b = getattr(self, name), getattr(other, name)
            if isinstance(spec, Array):
                if a.dtype != b.dtype or not np.array_equal(a, b):
                    return False
            elif isinstance(spec, Bytes):
                if memoryview(a).cast("B") != memoryview(b).cast("B"):
                    return False
            elif a != b:
                return False
        return True

    __hash__ = None  # type: ignore[assignment]


M = TypeVar("M", bound=Message)


def register(cls: type[M]) -> type[M]:
    """Build the class's schema table from its dataclass fields and register its wire name."""
    cls.SCHEMA = tuple((f.name, f.metadata["spec"]) for f in fields(cls))  # type: ignore[arg-type]
    if cls.TYPE in MESSAGE_TYPES:
        raise RuntimeError(f"duplicate wire type {cls.TYPE}")
    MESSAGE_TYPES[cls.TYPE] = cls
    return cls


_I32 = np.dtype("<i4")
_F32 = np.dtype("<f4")
_BOOL = np.dtype("|b1")
_ID = Str(ID_LEN, min_len=1)
_COUNT = Int(lo=0)
_VERSION = Int(lo=0)
_MAC = Str(32, pattern="(?:[0-9a-f]{32})?")  # protocol.auth.grant_mac; "" without CURVE


# ---------------------------------------------------------------- allocator <-> actor


@register
@dataclass(slots=True, frozen=True, eq=False)
class WorkRequest(Message):
    """Actor asks for up to `want` grants."""

    TYPE: ClassVar[str] = "WorkRequest"
    actor_id: str = wire(_ID)
    want: int = wire(Int(lo=1, hi=LIST_LEN))
    policy_version: int = wire(_VERSION)


@register
@dataclass(slots=True, frozen=True, eq=False)
class WorkGrant(Message):
    """One prompt with its sample budget n; a re-issue keeps grant_id and gets a new lease_id."""

    TYPE: ClassVar[str] = "WorkGrant"
    grant_id: int = wire(_COUNT)
    lease_id: int = wire(_COUNT)
    problem_id: str = wire(_ID)
    prompt: str = wire(Str(TEXT_LEN, min_len=1))
    answer: str = wire(Str(TEXT_LEN))
    verifier: str = wire(_ID)
    n: int = wire(Int(lo=1, hi=MAX_SAMPLES))
    lease_s: float = wire(Float(lo=0.0))
    issued_version: int = wire(_VERSION)
    mac: str = wire(_MAC, default="")  # the allocator's MAC of this grant, for the learner


@register
@dataclass(slots=True, frozen=True, eq=False)
class NoWork(Message):
    """Allocator's reply when pacing or out of problems."""

    TYPE: ClassVar[str] = "NoWork"
    retry_after_s: float = wire(Float(lo=0.0, hi=3600.0))
    reason: str = wire(Str(1024))


@register
@dataclass(slots=True, frozen=True, eq=False)
class StatsReport(Message):
    """Bernoulli counts of one scored group: k successes out of n samples."""

    TYPE: ClassVar[str] = "StatsReport"
    grant_id: int = wire(_COUNT)
    lease_id: int = wire(_COUNT)
    problem_id: str = wire(_ID)
    actor_id: str = wire(_ID)
    k: int = wire(_COUNT)
    n: int = wire(Int(lo=1, hi=MAX_SAMPLES))

    def _check(self) -> None:
        if self.k > self.n:
            raise InvalidValue(f"expected k <= n = {self.n}, got {self.k}", msg_type=self.TYPE,
                               field="k")


@register
@dataclass(slots=True, frozen=True, eq=False)
class Heartbeat(Message):
    """Liveness of any service; `in_flight` lists the grant ids the sender holds."""

    TYPE: ClassVar[str] = "Heartbeat"
    sender: str = wire(_ID)
    role: str = wire(Str(64, min_len=1))
    sent_at: float = wire(Float())
    policy_version: int = wire(_VERSION)
    in_flight: list[int] = wire(ListOf(_COUNT, LIST_LEN))


@register
@dataclass(slots=True, frozen=True, eq=False)
class Error(Message):
    """A rejection sent back to a peer; `code` is a `ProtocolError.code` or a service code."""

    TYPE: ClassVar[str] = "Error"
    code: str = wire(Str(64, min_len=1))
    message: str = wire(Str(4096))
    ref: int = wire(Int())

    @classmethod
    def from_exception(cls, err: Exception, ref: int = -1) -> Error:
        code = getattr(err, "code", type(err).__name__)
        return cls(code=str(code)[:64] or "error", message=str(err)[:4096], ref=ref)


# ---------------------------------------------------------------- actor -> learner


class Sample(NamedTuple):
    """One completion of a group, as views into the group's arrays."""

    token_ids: np.ndarray
    logprobs: np.ndarray
    versions: np.ndarray
    reward: float
    finished: bool


@register
@dataclass(slots=True, frozen=True, eq=False)
class RolloutGroup(Message):
    """The n completions of one grant, concatenated token-wise (groups are atomic)."""

    TYPE: ClassVar[str] = "RolloutGroup"
    grant_id: int = wire(_COUNT)
    lease_id: int = wire(_COUNT)
    problem_id: str = wire(_ID)
    actor_id: str = wire(_ID)
    prompt_token_ids: np.ndarray = wire(Array(_I32, MAX_TOKENS))
    completion_token_ids: np.ndarray = wire(Array(_I32, MAX_TOKENS))
    completion_lengths: np.ndarray = wire(Array(_I32, MAX_SAMPLES))
    behaviour_logprobs: np.ndarray = wire(Array(_F32, MAX_TOKENS))
    token_versions: np.ndarray = wire(Array(_I32, MAX_TOKENS))
    rewards: np.ndarray = wire(Array(_F32, MAX_SAMPLES))
    finished: np.ndarray = wire(Array(_BOOL, MAX_SAMPLES))  # True: EOS, False: truncated
    gen_seconds: float = wire(Float(lo=0.0))
    grant_mac: str = wire(_MAC, default="")  # WorkGrant.mac of the grant, echoed

    def _check(self) -> None:
        t = self.TYPE
        # Per-sample arrays are short (n <= MAX_SAMPLES): plain Python beats numpy call overhead.
        lengths = self.completion_lengths.tolist()
        n = len(lengths)
        if n < 1:
            raise ArrayMismatch("expected at least one sample, got int32[0]", msg_type=t,
                                field="completion_lengths")
        if min(lengths) < 0:
            raise InvalidValue(f"expected lengths >= 0, got {min(lengths)}", msg_type=t,
                               field="completion_lengths")
        n_tokens = sum(lengths)
        for name, want, why in (
            ("rewards", n, "len(completion_lengths)"),
            ("finished", n, "len(completion_lengths)"),
            ("completion_token_ids", n_tokens, "sum of completion_lengths"),
            ("behaviour_logprobs", n_tokens, "sum of completion_lengths"),
            ("token_versions", n_tokens, "sum of completion_lengths"),
        ):
            a = getattr(self, name)
            if a.size != want:
                raise ArrayMismatch(f"expected {a.dtype.name} with {want} elements ({why}), "
                                    f"got {describe_array(a)}", msg_type=t, field=name)
        # A float64 sum of float32 values cannot overflow; NaN and +-inf propagate into it.
        if not math.isfinite(sum(self.rewards.tolist())):
            raise InvalidValue("expected finite rewards", msg_type=t, field="rewards")
        if n_tokens == 0:
            return
        # Token ids are left to the learner, which alone knows the vocabulary size.
        # These scans read every token once: they are most of the cost of decoding a group.
        if self.token_versions.min() < 0:
            raise InvalidValue(f"expected versions >= 0, got {int(self.token_versions.min())}",
                               msg_type=t, field="token_versions")
        lp = self.behaviour_logprobs
        # max and min propagate NaN, so these two comparisons also reject NaN.
        if not (lp.max() <= LOGPROB_EPS and lp.min() > -np.inf):
            raise InvalidValue(f"expected finite log-probs <= {LOGPROB_EPS}, got range "
                               f"[{lp.min()}, {lp.max()}]", msg_type=t, field="behaviour_logprobs")

    @property
    def n(self) -> int:
        return int(self.completion_lengths.size)

    @property
    def num_tokens(self) -> int:
        return int(self.completion_token_ids.size)

    @property
    def offsets(self) -> np.ndarray:
        """int64[n + 1]: sample i spans tokens offsets[i]:offsets[i + 1]."""
        out = np.zeros(self.n + 1, dtype=np.int64)
        np.cumsum(self.completion_lengths, out=out[1:])
        return out

    @property
    def oldest_version(self) -> int | None:
        """Policy version of the stalest token (None if every completion is empty)."""
        return int(self.token_versions.min()) if self.num_tokens else None

    def sample(self, i: int) -> Sample:
        o = self.offsets
        s = slice(int(o[i]), int(o[i + 1]))
        return Sample(self.completion_token_ids[s], self.behaviour_logprobs[s],
                      self.token_versions[s], float(self.rewards[i]), bool(self.finished[i]))

    def samples(self) -> list[Sample]:
        return [self.sample(i) for i in range(self.n)]


@register
@dataclass(slots=True, frozen=True, eq=False)
class LearnerProgress(Message):
    """Learner's position: current policy version and what it has consumed or dropped;
    `session` is drawn anew by each learner process (a change marks a restart, the only time
    consumed_groups may go backwards); `received` lists grant ids whose groups reached the
    learner since its previous progress message (receipts); `resumed` the grant ids the
    checkpoint this session started from holds (trained or dropped), as flat half-open
    ranges [start0, end0, start1, end1, ...]: at a new session the allocator settles, by id,
    what the old one received and the new one does not hold (allocator/ledger.py)."""

    TYPE: ClassVar[str] = "LearnerProgress"
    version: int = wire(_VERSION)
    consumed_groups: int = wire(_COUNT)
    consumed_samples: int = wire(_COUNT)
    dropped_stale: int = wire(_COUNT)
    session: int = wire(_COUNT, default=0)
    received: list[int] = wire(ListOf(_COUNT, LIST_LEN), default_factory=list)
    resumed: list[int] = wire(ListOf(_COUNT, RESUMED_LEN), default_factory=list)
    # (grant_id, lease_id) pairs, flat, of groups the learner refused since its previous
    # message (their grant MAC checked): the allocator re-issues them at once
    refused: list[int] = wire(ListOf(_COUNT, LIST_LEN), default_factory=list)


# ---------------------------------------------------------------- learner -> actors: weights

# Tensor dtypes as torch names (numpy lacks bfloat16/float8), with their item sizes.
WEIGHT_DTYPES: dict[str, int] = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1,
    "float8_e5m2": 1, "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1,
}


class TensorMeta(NamedTuple):
    """Where one tensor lives in the flat weight blob of a `WeightAnnounce`."""

    name: str
    dtype: str
    shape: list[int]
    offset: int
    nbytes: int


_TENSOR = Record(TensorMeta, (
    Str(1024, min_len=1),
    Str(16, pattern="|".join(WEIGHT_DTYPES)),
    ListOf(_COUNT, 8),
    _COUNT,
    _COUNT,
))


@register
@dataclass(slots=True, frozen=True, eq=False)
class WeightAnnounce(Message):
    """Start of a weight transfer: the blob is sent as n_chunks chunks of chunk_bytes (last may
    be shorter); `tensors` lays the blob out. Each chunk carries its own checksum."""

    TYPE: ClassVar[str] = "WeightAnnounce"
    version: int = wire(_VERSION)
    total_bytes: int = wire(_COUNT)
    chunk_bytes: int = wire(Int(lo=1, hi=MAX_CHUNK_BYTES))
    n_chunks: int = wire(_COUNT)
    tensors: list[TensorMeta] = wire(ListOf(_TENSOR, LIST_LEN))

    def _check(self) -> None:
        t = self.TYPE
        want_chunks = -(-self.total_bytes // self.chunk_bytes)
        if self.n_chunks != want_chunks:
            raise InvalidValue(f"expected ceil(total_bytes / chunk_bytes) = {want_chunks}, got "
                               f"{self.n_chunks}", msg_type=t, field="n_chunks")
        end, names = 0, set()
        for i, tm in sorted(enumerate(self.tensors), key=lambda it: it[1].offset):
            where = f"tensors[{i}]"
            want = math.prod(tm.shape) * WEIGHT_DTYPES[tm.dtype]
            if tm.nbytes != want:
                raise InvalidValue(f"expected nbytes = {want} for {tm.dtype}{tm.shape}, got "
                                   f"{tm.nbytes}", msg_type=t, field=f"{where}.nbytes")
            if tm.offset < end or tm.offset + tm.nbytes > self.total_bytes:
                raise InvalidValue(f"bytes [{tm.offset}, {tm.offset + tm.nbytes}) overlap another "
                                   f"tensor or exceed total_bytes {self.total_bytes}", msg_type=t,
                                   field=f"{where}.offset")
            if tm.name in names:
                raise InvalidValue(f"duplicate tensor name {tm.name!r}", msg_type=t,
                                   field=f"{where}.name")
            end = tm.offset + tm.nbytes
            names.add(tm.name)


@register
@dataclass(slots=True, frozen=True, eq=False)
class WeightChunk(Message):
    """Chunk `index` of the blob announced for `version` (bytes [index * chunk_bytes, ...));
    `crc32c` of `data` (CRC-32C, Castagnoli: the SSE4.2/ARMv8 instruction, 21 GB/s here vs
    zlib's CRC-32 at 4 GB/s), checked on arrival: an end-to-end check against transport or
    reassembly bugs (authenticity is CURVE's job; SHA-256 was 2.3x zlib's CPU per byte)."""

    TYPE: ClassVar[str] = "WeightChunk"
    version: int = wire(_VERSION)
    index: int = wire(_COUNT)
    data: bytes | bytearray | memoryview = wire(Bytes(MAX_CHUNK_BYTES))
    crc32c: int = wire(Int(lo=0, hi=2**32 - 1))


@register
@dataclass(slots=True, frozen=True, eq=False)
class WeightAck(Message):
    """Credit: the actor holds every chunk below `next_index` of `version` and wants more."""

    TYPE: ClassVar[str] = "WeightAck"
    actor_id: str = wire(_ID)
    version: int = wire(_VERSION)
    next_index: int = wire(_COUNT)


# ---------------------------------------------------------------- collective weight broadcast
# Control of the `broadcast` weights backend travels on the weights socket; the bytes travel
# in a torch process group (gloo on CPU, NCCL on GPU) of the learner (rank 0) and the actors.


@register
@dataclass(slots=True, frozen=True, eq=False)
class WeightGroupJoin(Message):
    """Learner -> actor: enter broadcast group `epoch` as `rank` of `world` (rank 0 is the
    learner), rendezvous at host:port, collectives time out after timeout_s."""

    TYPE: ClassVar[str] = "WeightGroupJoin"
    epoch: int = wire(Int(lo=1))
    rank: int = wire(Int(lo=1))
    world: int = wire(Int(lo=2, hi=1 << 16))
    host: str = wire(Str(255, min_len=1))
    port: int = wire(Int(lo=1, hi=65535))
    timeout_s: float = wire(Float())
    ranks: int = wire(Int(lo=1, hi=1 << 10), default=1)  # rank .. rank + ranks - 1: one per
    # worker of the actor's engine (its tensor-parallel size)

    def _check(self) -> None:
        if self.rank + self.ranks > self.world:
            raise InvalidValue(f"ranks {self.rank}..{self.rank + self.ranks - 1} outside a "
                               f"world of {self.world}", msg_type=self.TYPE, field="rank")
        if not 0 < self.timeout_s <= 3600:
            raise InvalidValue(f"timeout_s must be in (0, 3600], got {self.timeout_s}",
                               msg_type=self.TYPE, field="timeout_s")


@register
@dataclass(slots=True, frozen=True, eq=False)
class WeightGroupReady(Message):
    """Actor -> learner: it can take part in broadcasts (epoch 0: an offer, sent with its
    hello, saying how many chain ranks its engine's workers need), or it joined group `epoch`
    (ok) or failed to (not ok)."""

    TYPE: ClassVar[str] = "WeightGroupReady"
    actor_id: str = wire(_ID)
    epoch: int = wire(_COUNT)
    ok: bool = wire(Bool())
    ranks: int = wire(Int(lo=1, hi=1 << 10), default=1)


@register
@dataclass(slots=True, frozen=True, eq=False)
class WeightBroadcast(Message):
    """Learner -> group member: `version` follows as n_chunks collective broadcasts of
    chunk_bytes (the last may be shorter) in group `epoch`; `tensors` lays the blob out as in
    a `WeightAnnounce`, crc32c is the whole blob's CRC-32C."""

    TYPE: ClassVar[str] = "WeightBroadcast"
    epoch: int = wire(Int(lo=1))
    version: int = wire(_VERSION)
    total_bytes: int = wire(_COUNT)
    chunk_bytes: int = wire(Int(lo=1, hi=1 << 40))
    n_chunks: int = wire(_COUNT)
    crc32c: int = wire(Int(lo=0, hi=2**32 - 1))
    tensors: list[TensorMeta] = wire(ListOf(_TENSOR, LIST_LEN))

    def _check(self) -> None:
        WeightAnnounce._check(self)  # the same layout invariants

    def announce(self) -> WeightAnnounce:
        return WeightAnnounce(version=self.version, total_bytes=self.total_bytes,
                              chunk_bytes=self.chunk_bytes, n_chunks=self.n_chunks,
                              tensors=self.tensors)
