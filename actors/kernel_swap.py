"""Weight updates prepared off the engine thread, swapped in between steps (vLLM CPU backend).

vLLM's in-place `reload_weights` rebuilds every layer while the engine waits: it restores the
layer from meta tensors, runs the weight loaders, and on CPU re-packs each linear weight into a
oneDNN (or sgl) kernel handle. For the 453 MB test model that is 0.25 s idle and 0.5-0.9 s on
busy cores, all of it a pause in generation; the packing alone is 0.15 s.

Here the expensive part runs on another thread while the engine keeps generating with the old
weights: new kernel handles are built from staging copies of the new weights, never touching
the live model. Between two engine steps the engine thread then only swaps the handles in and
copies the small tensors (norms, biases, embeddings) into place.

Scope, checked when the plan is built (anything else falls back to vLLM's reload):
- CPU platform, tensor parallelism 1, unquantized linear and embedding methods, not the
  zentorch path (its unpacked handle would alias our staging memory);
- every incoming name resolves to a module of the vLLM model, directly or through the model's
  `packed_modules_mapping` (q/k/v -> qkv_proj, gate/up -> gate_up_proj), and the pieces tile the
  kernel tensor exactly (vocabulary padding excepted: padding rows keep their values).
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

log = logging.getLogger("dynamo.actor")


class Unsupported(Exception):
    """This model or platform needs vLLM's own reload."""


@dataclass(slots=True)
class _Target:
    """One live parameter that incoming tensors fill (several, for a packed module)."""
    module: torch.nn.Module
    name: str  # parameter name within the module
    live: torch.Tensor
    shape: tuple[int, ...]  # kernel shape (the live shape, or the removed weight's shape)
    pieces: list[tuple[str, int, int]] = field(default_factory=list)  # (source, row0, rows)
    handles: list[torch.nn.Module] = field(default_factory=list)  # modules to re-pack from it
    remove_weight: bool = False  # the module's live weight was removed after packing
    staging: torch.Tensor | None = None  # persistent, only read while packing


@dataclass(slots=True)
class Prepared:
    """A version ready to swap in: small tensors to copy into place and new kernel handles."""
    copies: list[tuple[torch.Tensor, torch.Tensor]]  # (live view, source)
    handles: list[tuple[torch.nn.Module, Callable]]  # (module, new cpu_linear)


class KernelSwap:
    """Built once per engine; `prepare` may run on any thread, `swap` on the engine's."""

    def __init__(self, model: torch.nn.Module, names: Sequence[tuple[str, tuple[int, ...],
                                                                    torch.dtype]]) -> None:
        from vllm.model_executor.layers.linear import UnquantizedLinearMethod
        from vllm.model_executor.layers.vocab_parallel_embedding import (
            UnquantizedEmbeddingMethod,
        )
        from vllm.platforms import current_platform

        if not current_platform.is_cpu() or current_platform.is_zen_cpu():
            raise Unsupported("not the plain CPU platform")
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        self._dispatch = dispatch_cpu_unquantized_gemm
        modules = dict(model.named_modules())
        for mname, m in modules.items():
            qm = getattr(m, "quant_method", None)
            if qm is not None and not isinstance(qm, UnquantizedLinearMethod
                                                 | UnquantizedEmbeddingMethod):
                raise Unsupported(f"{mname} uses {type(qm).__name__}")
            if getattr(m, "tp_size", 1) != 1:
                raise Unsupported(f"{mname} is tensor-parallel")
        packed = {leaf: (fused, i)
                  for fused, leaves in (getattr(model, "packed_modules_mapping", None)
                                        or {}).items()
                  for i, leaf in enumerate(leaves)}
        targets: dict[tuple[str, str], _Target] = {}
        order: dict[tuple[str, str], list[tuple[int, str, int]]] = {}
        for name, shape, dtype in names:
            prefix, _, pname = name.rpartition(".")
            mpath, _, leaf = prefix.rpartition(".")
            shard = 0
            if leaf in packed and prefix not in modules:
                leaf, shard = packed[leaf]
            mname = f"{mpath}.{leaf}" if mpath else leaf
            m = modules.get(mname)
            live = getattr(m, pname, None) if m is not None else None
            if not isinstance(live, torch.Tensor):
                raise Unsupported(f"{name} has no parameter in the engine's model")
            if live.dtype != dtype:
                raise Unsupported(f"{name}: {dtype} on the wire, {live.dtype} in the engine")
            key = (mname, pname)
            if key not in targets:
                removed = live.numel() == 0 and hasattr(m, "cpu_linear")
                kshape = self._kernel_shape(m, pname) if removed else tuple(live.shape)
                targets[key] = _Target(m, pname, live, kshape, remove_weight=removed)
            order.setdefault(key, []).append((shard, name, shape[0] if shape else 1))
            if tuple(shape[1:]) != targets[key].shape[1:]:
                raise Unsupported(f"{name}: shape {shape} vs kernel {targets[key].shape}")
        for key, parts in order.items():
            t = targets[key]
            row = 0
            for _, src, rows in sorted(parts):
                t.pieces.append((src, row, rows))
                row += rows
            padded = isinstance(getattr(t.module, "quant_method", None),
                                UnquantizedEmbeddingMethod)
            if row != t.shape[0] and not (padded and row < t.shape[0]):
                raise Unsupported(f"{key[0]}.{key[1]}: {row} rows arrive for {t.shape[0]}")
        covered = {id(t.live) for t in targets.values()}
        missing = [n for n, prm in model.named_parameters() if id(prm) not in covered]
        if missing:
            raise Unsupported(f"no incoming weight for {missing[:3]}")
        # Every module packed into a kernel handle must get a new one from its new weight,
        # tied ones included (the LM head shares the embedding's parameter).
        by_param = {id(t.live): t for t in targets.values() if not t.remove_weight}
        for mname, m in modules.items():
            if not hasattr(m, "cpu_linear"):
                continue
            w = getattr(m, "weight", None)
            t = targets.get((mname, "weight")) or by_param.get(id(w))
            if t is None:
                raise Unsupported(f"{mname} is packed but no weight for it arrives")
            t.handles.append(m)
        self.targets = list(targets.values())
        for t in self.targets:
            if t.handles and (len(t.pieces) > 1 or t.pieces[0][2] != t.shape[0]):
                t.staging = (torch.empty(t.shape, dtype=t.live.dtype) if t.remove_weight
                             else t.live.detach().clone())  # keeps the padding rows

    @staticmethod
    def _kernel_shape(m: torch.nn.Module, pname: str) -> tuple[int, ...]:
        if pname != "weight":
            raise Unsupported(f"{type(m).__name__}.{pname} was removed")
        out = getattr(m, "output_size_per_partition", None)
        inp = getattr(m, "input_size_per_partition", None)
        if out is None or inp is None:
            raise Unsupported(f"{type(m).__name__} has no partition sizes")
        return (int(out), int(inp))

    def prepare(self, tensors: dict[str, torch.Tensor]) -> Prepared:
        """Pack new kernel handles from `tensors`, on any thread, while the engine generates;
        the live model is not touched. The tensors must stay untouched until the swap: the
        small ones are copied from them then."""
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        handles: list[tuple[torch.nn.Module, Callable]] = []
        with torch.no_grad():
            for t in self.targets:
                if not t.remove_weight:
                    for src, row, rows in t.pieces:
                        copies.append((t.live.narrow(0, row, rows), tensors[src]))
                if not t.handles:
                    continue
                if t.staging is None:
                    weight = tensors[t.pieces[0][0]]
                else:
                    for src, row, rows in t.pieces:
                        t.staging.narrow(0, row, rows).copy_(tensors[src])
                    weight = t.staging
                for m in t.handles:
                    proxy = types.SimpleNamespace(weight=weight, bias=None)
                    self._dispatch(proxy, remove_weight=False)
                    handles.append((m, proxy.cpu_linear))
        return Prepared(copies, handles)

    @staticmethod
    def swap(p: Prepared) -> None:
        with torch.no_grad():
            for live, src in p.copies:
                live.copy_(src)
        for m, fn in p.handles:
            m.cpu_linear = fn

