"""vLLM general plugin (entry point `vllm.general_plugins: dynamo_rl`): registers our weight
transfer engine (`actors/transfer_engine.py`) with vLLM's factory. vLLM loads general plugins
in every process it starts (engine core, each tensor-parallel worker); the actor also calls
`register()` itself before building its engine, which covers the in-process worker and an
install whose entry points are stale."""

from __future__ import annotations

BACKEND = "dynamo_chain"  # = actors.transfer_engine.BACKEND (not imported: that pulls in vLLM)


def register() -> None:
    """Registers backend "dynamo_chain" (lazily: the module is imported when an engine is
    created). Idempotent: vLLM may load plugins several times in one process."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    if BACKEND not in WeightTransferEngineFactory._registry:  # register_engine refuses twice
        WeightTransferEngineFactory.register_engine(
            BACKEND, "actors.transfer_engine", "ChainTransferEngine")
