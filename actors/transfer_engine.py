"""Our `broadcast` weights backend as a vLLM weight-transfer engine (backend "dynamo_chain"),
run by vLLM inside every worker of an actor's engine.

The actor drives it with vLLM's own worker calls, through `collective_rpc` (so every worker of
a tensor-parallel engine runs the same call):
- `init_weight_transfer_engine(init_info)`: join broadcast group `epoch` (`ChainInitInfo`);
- `start_weight_update()`, `update_weights(update_info)`, `finish_weight_update()`: one
  version (`ChainUpdateInfo`): received down the learner's pipelined chain into a buffer
  (`protocol.broadcast.chain_broadcast`, the same chain the learner's `WeightPublisher` sends)
  or handed over inline (a version that came over ZeroMQ), then loaded with the model's
  `load_weights`, which shards and fuses checkpoint-named tensors for this worker's rank.

Guarantees:
- A version is loaded only once all of it arrived and its CRC-32C matches the learner's; a
  failed or corrupt transfer raises before the model is touched, so the engine keeps
  generating with the weights it had (the actor then fetches the version over ZeroMQ).
  A transfer that broke the group leaves this worker out of it until the next join.
- Loading follows vLLM's layer-wise reload (kernel tensors are re-processed in place, as
  `reload_weights` does; on CPU that repacks the GEMM weights); `finish_weight_update`
  completes it. After it no model tensor lives in the receive buffer, so the buffer is
  reused for the next version of the same size.
- Chain ranks: worker t of a tensor-parallel engine is rank `rank + t`; the learner gives an
  actor `ranks` consecutive ranks, which must equal its tensor-parallel size.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from crc32c import crc32c
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from protocol.blob import unpack_weights
from protocol.broadcast import chain_broadcast, chunk_views, open_group
from protocol.messages import TensorMeta, WeightAnnounce

BACKEND = "dynamo_chain"
log = logging.getLogger("dynamo.actor")


class TransferFailed(RuntimeError):
    """A version did not arrive whole (broken link, timeout, wrong group, bad checksum); the
    model was not touched."""


@dataclass
class ChainInitInfo(WeightTransferInitInfo):
    """Where and how to join broadcast group `epoch` (from the learner's `WeightGroupJoin`)."""

    host: str  # the learner's rendezvous (TCPStore)
    port: int
    epoch: int
    rank: int  # this actor's first chain rank (rank 0 is the learner)
    world: int
    timeout_s: float
    local_host: str  # this machine's interface towards the learner (gloo binds it)
    ranks: int = 1  # consecutive chain ranks of this actor: one per tensor-parallel worker


@dataclass
class ChainUpdateInfo(WeightTransferUpdateInfo):
    """One version: either the chain broadcast of `epoch` laid out as a `WeightBroadcast`
    (total_bytes in n_chunks of chunk_bytes, whole-blob crc32c, `tensors` as TensorMeta
    fields), or `inline` tensors already on this host (a version received over ZeroMQ)."""

    version: int
    epoch: int = 0
    total_bytes: int = 0
    chunk_bytes: int = 1
    n_chunks: int = 0
    crc32c: int = 0
    tensors: list = field(default_factory=list)
    inline: list[tuple[str, torch.Tensor]] | None = None

    def announce(self) -> WeightAnnounce:
        return WeightAnnounce(version=self.version, total_bytes=self.total_bytes,
                              chunk_bytes=self.chunk_bytes, n_chunks=self.n_chunks,
                              tensors=[TensorMeta(*t) for t in self.tensors])


def parallel_layout() -> tuple[int, int, int]:
    """(tensor-parallel rank, tensor-parallel size, pipeline-parallel size) of this worker."""
    from vllm.distributed.parallel_state import (
        get_pp_group,
        get_tensor_model_parallel_rank,
        get_tensor_model_parallel_world_size,
    )

    return (get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size(),
            get_pp_group().world_size)


class ChainTransferEngine(WeightTransferEngine[ChainInitInfo, ChainUpdateInfo]):
    """Worker side of the "dynamo_chain" backend (one instance per vLLM worker)."""

    init_info_cls = ChainInitInfo
    update_info_cls = ChainUpdateInfo
    supports_draft_weight_update = False  # actors run no speculative draft model

    def __init__(self, config, vllm_config, device: torch.device, model: torch.nn.Module
                 ) -> None:
        super().__init__(config, vllm_config, device, model)
        self._pg = None
        self._epoch = self._rank = self._world = 0
        self._timeout_s = 30.0
        self._buffer: bytearray | None = None  # reused for the next version of the same size
        self._reloading = False  # the layer-wise reload of this session has begun

    # ------------------------------------------------------------ group
    def init_transfer_engine(self, init_info: ChainInitInfo) -> None:
        """Joins broadcast group `epoch` as rank `rank + tensor-parallel rank`; blocks until
        every rank joined or timeout_s passed (then raises, and this worker is in no group)."""
        tp_rank, tp_size, pp_size = parallel_layout()
        if pp_size != 1:
            raise ValueError(f"weight backend {BACKEND!r} loads the whole model in every worker:"
                             f" pipeline parallelism ({pp_size} stages) is not supported")
        if init_info.ranks != tp_size:
            raise ValueError(f"broadcast group {init_info.epoch} gave this actor "
                             f"{init_info.ranks} chain rank(s), but its engine has {tp_size} "
                             "tensor-parallel workers: each needs its own rank")
        self._pg = None
        rank = init_info.rank + tp_rank
        store = torch.distributed.TCPStore(
            init_info.host, init_info.port, init_info.world, is_master=False,
            timeout=datetime.timedelta(seconds=init_info.timeout_s))
        self._pg = open_group(store, init_info.epoch, rank, init_info.world,
                              init_info.local_host, init_info.timeout_s)
        self._epoch, self._rank, self._world = init_info.epoch, rank, init_info.world
        self._timeout_s = init_info.timeout_s

    def shutdown(self) -> None:
        """Leaves the group (the learner forms the next epoch without this worker)."""
        self._pg = None
        self._buffer = None

    # ------------------------------------------------------------ one version
    def start_weight_update(self) -> None:
        """Opens a session. The model is not touched until a version arrived whole (see
        `receive_weights`): a failed transfer must leave the engine generating as before."""
        self._reloading = False

    def update_weights(self, update_info: dict[str, Any]) -> None:
        """As the base class, without its accelerator synchronisation when there is none
        (CPU: `torch.accelerator.synchronize` raises; loading on CPU is synchronous)."""
        self.receive_weights(self.parse_update_info(update_info))
        if torch.accelerator.is_available():
            torch.accelerator.synchronize()

    def receive_weights(self, update_info: ChainUpdateInfo) -> None:
        if update_info.inline is not None:
            named = update_info.inline
        else:
            named = unpack_weights(update_info.announce(), self._receive_blob(update_info))
        if not self._reloading:
            from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

            initialize_layerwise_reload(self.model)
            self._reloading = True
        self.model.load_weights(named)

    def finish_weight_update(self) -> None:
        """Completes the layer-wise reload (layers that got no tensor keep their weights) and
        re-processes a tied LM head, which receives no tensor of its own."""
        if not self._reloading:
            return  # nothing was loaded in this session
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        from actors.engine import refresh_tied_lm_head

        finalize_layerwise_reload(self.model, self.model_config)
        refresh_tied_lm_head(self.model)
        self._reloading = False
        if self._buffer is not None and holds_memory_of(self.model, self._buffer):
            self._buffer = None  # the model kept a view of it: never overwrite it

    def _receive_blob(self, info: ChainUpdateInfo) -> bytearray:
        """The whole blob of `info`, checked against its CRC-32C; raises TransferFailed."""
        if self._pg is None or info.epoch != self._epoch:
            raise TransferFailed(f"weights v{info.version} are broadcast in group {info.epoch}, "
                                 f"this worker is in {'none' if self._pg is None else self._epoch}")
        if self._buffer is None or len(self._buffer) != info.total_bytes:
            self._buffer = bytearray(info.total_bytes)
        blob = self._buffer
        device = self.device if self.device.type != "cpu" else torch.device("cpu")
        try:
            chunks = chunk_views(blob, info.chunk_bytes, device)
            chain_broadcast(self._pg, chunks, self._rank, self._world, self._timeout_s)
            if device.type != "cpu":  # received on the device: into the host blob
                torch.frombuffer(blob, dtype=torch.uint8).copy_(torch.cat(chunks).cpu())
        except Exception as e:
            self._pg = None  # the group is broken for everyone: the learner forms a new one
            raise TransferFailed(f"broadcast of weights v{info.version} failed: {e}") from e
        if crc32c(blob) != info.crc32c:
            raise TransferFailed(f"weights v{info.version} from the broadcast failed their "
                                 "checksum")
        return blob


def holds_memory_of(model: torch.nn.Module, buf: bytearray) -> bool:
    """Whether any parameter or buffer of `model` lives inside `buf`."""
    lo = torch.frombuffer(buf, dtype=torch.uint8).data_ptr() if len(buf) else 0
    hi = lo + len(buf)
    return any(lo <= t.data_ptr() < hi for t in (*model.parameters(), *model.buffers()))
