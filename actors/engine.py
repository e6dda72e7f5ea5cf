"""A vLLM engine driven step by step, with per-token behaviour log-probs and versions.

Guarantees:
- One engine request per grant, with n samples (vLLM fans them out and shares the prompt's
  prefill); grants enter the engine's continuous batch as soon as they are added, and a group
  is returned once all its n samples finished (groups are atomic).
- Every generated token is reported with the log-prob of the distribution it was sampled
  from (vLLM `processed_logprobs`: after temperature / top-p) and the policy version of the
  weights that produced it. Weights are swapped between engine steps, in place (no engine
  restart; on CPU the new kernel handles are packed beforehand on another thread, so the
  engine pauses ~1 ms). New requests never reuse prompt KV cached under older weights: the
  prefix cache is salted per swap (resetting it fails while requests run, i.e. always in
  async mode). Samples in flight keep their KV (PipelineRL-style in-flight
  update): their later tokens carry the new version, and the learner's importance weights
  correct for the mixed context.
- Outputs are only materialised when a group finishes (FINAL_ONLY). The per-token versions
  come from vLLM's own weight versions (the engine core labels each step's tokens with the
  version set at the swap: `weight_versions` spans); the token counts recorded at each swap
  give the same stamps independently, and every disagreement is counted.
- `weight_loader = "vllm_api"` loads every version through vLLM's weight-transfer API instead
  (`collective_rpc` of start / update / finish_weight_update on every worker, our backend
  `actors/transfer_engine.py`): the path for tensor parallelism and GPUs. Broadcast versions
  are then received by the workers themselves, on the engine thread (the engine pauses for
  the transfer and the load); the version stamps and prefix-cache salting are the same.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from actors.kernel_swap import KernelSwap, Prepared, Unsupported

log = logging.getLogger("dynamo.actor")


def configure_vllm_env(kv_cache_gib: float, enforce_eager: bool = True) -> None:
    """Process-wide vLLM settings; must run before vllm is imported."""
    if enforce_eager:
        # Eager means no compilation anywhere: vLLM's sampler still compiles one small op
        # (the sampled token's rank, for logprobs) at its first call, 1.6 s on the critical
        # path of start-up on one core (and about a minute with a cold inductor cache)
        os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: 3-5 s start
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # vLLM's legacy whole-GiB variable overrides the engine's kv_cache_memory_bytes (it once
    # made every actor allocate 1 GiB whatever actor.kv_cache_gib said): the config decides
    if os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None) not in (None, ""):
        log.warning("VLLM_CPU_KVCACHE_SPACE is ignored: the KV cache size is actor.kv_cache_gib "
                    "(%.2f GiB)", kv_cache_gib)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from actors.config import ONEDNN_CACHE_CAPACITY

    # read by oneDNN when it first builds a primitive (the actor process sets it earlier)
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_CACHE_CAPACITY)


WEIGHT_LOADERS = ("packed", "vllm_api")


def cpu_tensor_parallel_binding(tensor_parallel_size: int, current: str | None) -> str:
    """vLLM CPU's thread binding for a tensor-parallel engine: one `|`-separated core list
    per worker (`VLLM_CPU_OMP_THREADS_BIND`). The cores are those already given to this actor
    (a plain list from the launcher, else the process's affinity), split into equal
    contiguous parts; a list that is already split is kept. vLLM's own "auto" binding wants a
    NUMA node per worker, which one-socket machines do not have."""
    if current and "|" in current:
        return current
    if current and current not in ("auto", "nobind"):
        from launch.cores import parse_cores

        cores = parse_cores(current)
    else:
        cores = sorted(os.sched_getaffinity(0))
    tp = tensor_parallel_size
    if len(cores) < tp:
        raise ValueError(f"actor.tensor_parallel_size = {tp} needs at least {tp} CPU cores "
                         f"(one per worker); this actor has {len(cores)}: {cores}")
    per = len(cores) // tp
    return "|".join(",".join(str(c) for c in cores[i * per:(i + 1) * per]) for i in range(tp))


def check_plugin_installed() -> None:
    """Tensor-parallel workers are processes of their own: vLLM finds our weight-transfer
    backend there only through the installed `vllm.general_plugins` entry point."""
    from importlib.metadata import entry_points

    if not any(e.value == "actors.vllm_plugin:register"
               for e in entry_points(group="vllm.general_plugins")):
        raise RuntimeError("actor.tensor_parallel_size > 1: the `vllm.general_plugins` entry "
                           "point of dynamo-rl is not installed, so vLLM's worker processes "
                           "cannot find our weight-transfer backend; run ./bootstrap.sh (or "
                           "pip install -e .)")


def check_weight_loader(weight_loader: str, tensor_parallel_size: int) -> None:
    """Refuses a weight loader that cannot reach the engine's workers."""
    if weight_loader not in WEIGHT_LOADERS:
        raise ValueError(f"actor.weight_loader = {weight_loader!r}: expected one of "
                         f"{', '.join(WEIGHT_LOADERS)}")
    if tensor_parallel_size > 1 and weight_loader != "vllm_api":
        # vLLM then runs a worker process per GPU: the in-process reload and the packed swap
        # cannot reach them; vLLM's weight-transfer API (collective_rpc) does.
        raise ValueError(f"actor.tensor_parallel_size = {tensor_parallel_size} needs "
                         f"actor.weight_loader = \"vllm_api\" (got {weight_loader!r}): the "
                         "packed swap and the in-process reload reach one in-process worker only")


def refresh_tied_lm_head(model: torch.nn.Module) -> None:
    """A tied LM head receives no tensor of its own in a reload, so vLLM puts its old
    kernel-format weights back (on CPU a pre-packed GEMM of the *old* embedding). Re-run its
    post-load processing so the logits use the new embedding."""
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if head is None or embed is None or getattr(head, "weight", None) is None:
        return
    if head.weight.data_ptr() == embed.weight.data_ptr():
        head.quant_method.process_weights_after_loading(head)


@dataclass(slots=True)
class Sample:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    truncated: bool = False


@dataclass(slots=True)
class Update:
    """New weights on their way into the engine: the tensors, and when the engine's layers
    can be re-packed off its thread, the prepared kernel handles."""
    tensors: list[tuple[str, torch.Tensor]]
    prepared: Prepared | None


@dataclass(slots=True)
class _Pending:
    n: int
    version: int  # weights at admission: the prefill and first tokens use them
    swaps: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # index -> (count, v)


class Engine:
    def __init__(self, model_path: str, *, max_model_len: int, max_tokens: int,
                 temperature: float, top_p: float, seed: int, kv_cache_gib: float,
                 dtype: str = "float32",
                 gpu_memory_utilization: float = 0.85, tensor_parallel_size: int = 1,
                 enforce_eager: bool = True, block_size: int | None = None,
                 weight_loader: str = "packed", sleep_mode: bool = False) -> None:
        check_weight_loader(weight_loader, tensor_parallel_size)
        configure_vllm_env(kv_cache_gib, enforce_eager)
        from vllm import LLM, SamplingParams
        from vllm.sampling_params import RequestOutputKind

        kwargs: dict = {} if block_size is None else {"block_size": block_size}
        self.weight_loader = weight_loader
        self.tensor_parallel_size = tensor_parallel_size
        if tensor_parallel_size > 1:
            check_plugin_installed()
            if not torch.cuda.is_available():
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_tensor_parallel_binding(
                    tensor_parallel_size, os.environ.get("VLLM_CPU_OMP_THREADS_BIND"))
        if weight_loader == "vllm_api":
            from vllm.config import WeightTransferConfig

            from actors.vllm_plugin import BACKEND, register

            register()  # the in-process worker's factory (TP workers load the entry point)
            kwargs["weight_transfer_config"] = WeightTransferConfig(backend=BACKEND)
        if not torch.cuda.is_available():
            if sleep_mode:
                raise ValueError("vLLM's sleep mode frees GPU memory; on CPU the colocated "
                                 "placement shares the cores instead")
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * (1 << 30))
        else:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
            if sleep_mode:
                kwargs["enable_sleep_mode"] = True
        self.asleep = False
        # vLLM's model loader and its own heap freeze run five full garbage collections over
        # every object the imports above created (about 2 s of start-up on one core); those
        # objects live as long as the process, so they leave the collector's generations now
        gc.freeze()
        self.llm = LLM(model=model_path, max_model_len=max_model_len, seed=seed,
                       enforce_eager=enforce_eager, tensor_parallel_size=tensor_parallel_size,
                       logprobs_mode="processed_logprobs", enable_prefix_caching=True, dtype=dtype,
                       **kwargs)
        self.engine = self.llm.llm_engine
        # detokenize=False: we use token ids only (scoring decodes the completion itself);
        # vLLM would otherwise decode every sampled token twice per step (text and logprob)
        self._params = dict(temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                            logprobs=0, output_kind=RequestOutputKind.FINAL_ONLY,
                            detokenize=False)
        self._sampling = SamplingParams
        self.max_tokens = max_tokens
        self.tokenizer = self.llm.get_tokenizer()
        self.version = 0
        self.pending: dict[str, _Pending] = {}
        self._swap: KernelSwap | None = None
        self._swaps = 0  # weight swaps so far: the prefix cache's salt (versions may repeat)
        self.cached_prompt_tokens = 0  # prompt tokens served from the prefix cache
        self._swap_metas: list | None = None  # the tensors the plan was built for
        # vLLM's in-place reload for every update: set after a packing failure (and by tests);
        # where packing does not apply (GPU, tensor parallelism...) the plan says so itself
        self.use_vllm_reload = False
        self.packing_failures = 0
        # vLLM's own per-token weight versions: the engine core labels the tokens of each step
        # with the version set here (outputs' `weight_versions` spans); ours, from the token
        # counts at each swap, are kept as the cross-check
        self.engine.set_weight_version("0")
        self.native_stamps = 0  # samples stamped from vLLM's spans
        self.stamp_disagreements = 0  # samples where vLLM's spans and our counts differ

    def add(self, request_id: str, prompt_token_ids: list[int], n: int) -> None:
        """Queue n samples of one prompt; they come back together from `step`."""
        self.pending[request_id] = _Pending(n=n, version=self.version)
        # Salted with the weights in use: the prefix cache shares prompt KV between requests
        # admitted under the same weights only (the n samples of one request included).
        self.engine.add_request(request_id, {"prompt_token_ids": prompt_token_ids,
                                             "cache_salt": f"w{self._swaps}"},
                                self._sampling(n=n, **self._params))

    def busy(self) -> bool:
        return self.engine.has_unfinished_requests()

    def step(self) -> list[tuple[str, list[Sample]]]:
        """One engine step; returns the groups whose n samples all finished in it."""
        done = []
        for out in self.engine.step():
            if not out.finished:
                continue
            p = self.pending.pop(out.request_id, None)
            if p is None:
                continue
            self.cached_prompt_tokens += out.num_cached_tokens or 0
            samples = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                toks = list(c.token_ids)
                # logprobs=0 returns exactly the sampled token's log-prob at each position
                lps = [lp[t].logprob for t, lp in zip(toks, c.logprobs or [], strict=True)]
                versions = [p.version] * len(toks)
                for count, v in p.swaps.get(c.index, ()):
                    versions[count:] = [v] * max(0, len(toks) - count)
                versions = self._native_versions(c, versions)
                samples.append(Sample(toks, lps, versions, c.finish_reason == "length"))
            done.append((out.request_id, samples))
        return done

    def _native_versions(self, c, ours: list[int]) -> list[int]:
        """Per-token versions from vLLM's spans where it reported them (else ours); every
        disagreement between the two is counted."""
        spans = getattr(c, "weight_versions", None)
        if not spans or not all(s.version.isdigit() for s in spans):
            return ours
        native = list(ours)
        for s in spans:
            native[s.start:s.end] = [int(s.version)] * (s.end - s.start)
        self.native_stamps += 1
        if native != ours:
            self.stamp_disagreements += 1
            if self.stamp_disagreements == 1:
                log.warning("vLLM's per-token weight versions differ from the swap counts "
                            "(%s vs %s); using vLLM's", native, ours)
        return native

    def _record_swap(self, version: int) -> None:
        """Before new weights: how many tokens each in-flight sample has generated so far."""
        for state in self.engine.output_processor.request_states.values():
            rid = state.parent_req.external_req_id if state.parent_req else state.external_req_id
            p = self.pending.get(rid)
            if p is None:
                continue
            lp = state.logprobs_processor
            count = len(lp.logprobs) if lp is not None and lp.logprobs is not None else 0
            p.swaps.setdefault(state.request_index, []).append((count, version))

    def prepare_weights(self, tensors: list[tuple[str, torch.Tensor]]) -> Update:
        """Make new weights ready to swap in. Safe on any thread while the engine generates:
        on CPU it packs the new kernel handles without touching the live model (see
        `actors/kernel_swap.py`); where that does not apply (GPU, tensor parallelism,
        quantization, unknown names) `apply_weights` runs vLLM's in-place reload instead, and
        with `weight_loader = "vllm_api"` vLLM's weight-transfer API.
        The tensors must stay untouched until `apply_weights`."""
        if self.weight_loader == "vllm_api":
            return Update(tensors, None)
        metas = [(n, tuple(t.shape), t.dtype) for n, t in tensors]
        if metas != self._swap_metas and not self.use_vllm_reload:
            self._swap, self._swap_metas = None, metas  # first version, or another layout
            try:
                self._swap = KernelSwap(self._model(), metas)
                log.info("weight updates are packed off the engine thread (%d tensors)",
                         len(self._swap.targets))
            except Unsupported as e:
                log.info("weight updates use vLLM's in-place reload: %s", e)
        if self._swap is None or self.use_vllm_reload:
            return Update(tensors, None)
        try:
            return Update(tensors, self._swap.prepare(dict(tensors)))
        except Exception:  # never lose a version over it: vLLM's reload still works
            log.exception("packing new weights off the engine thread failed; using vLLM's "
                          "in-place reload from now on")
            self.packing_failures += 1
            self.use_vllm_reload = True
            return Update(tensors, None)

    def apply_weights(self, update: Update, version: int) -> None:
        """Swap prepared weights in, between steps, and stamp `version` on every later token."""
        if self.weight_loader == "vllm_api":
            self._load_through_api({"version": version, "inline": update.tensors})
        elif update.prepared is not None:
            KernelSwap.swap(update.prepared)
        else:
            worker = self.engine.model_executor.driver_worker.worker
            worker.reload_weights(weights_iterator=iter(update.tensors))
            refresh_tied_lm_head(worker.model_runner.model)
        self._swapped(version)

    # ------------------------------------------------ vLLM's weight-transfer API (vllm_api)
    def join_weight_group(self, init_info: dict) -> None:
        """Every worker joins the learner's broadcast group (a `ChainInitInfo` as a dict);
        blocks until the group formed, raises if it did not."""
        self.llm.collective_rpc("init_weight_transfer_engine", kwargs={"init_info": init_info})

    def receive_weights(self, update_info: dict, version: int) -> None:
        """Every worker receives one broadcast version (a `ChainUpdateInfo` as a dict) and
        loads it; later tokens carry `version`. Raises if it did not arrive whole, and then
        the engine still holds the weights it had."""
        self._load_through_api(update_info)
        self._swapped(version)

    def _load_through_api(self, update_info: dict) -> None:
        if self.weight_loader != "vllm_api":
            raise RuntimeError("weights come through vLLM's weight-transfer API only with "
                               "actor.weight_loader = \"vllm_api\" (the engine was built without "
                               "its weight-transfer backend)")
        self.llm.collective_rpc("start_weight_update")
        # On failure vLLM's workers close the session themselves (no finish_weight_update)
        # and ours left the model untouched.
        self.llm.collective_rpc("update_weights", kwargs={"update_info": update_info})
        self.llm.collective_rpc("finish_weight_update")

    def _swapped(self, version: int) -> None:
        """After new weights went in between two steps: stamp `version` on later tokens (the
        token counts recorded now are those at the swap: no step ran during it) and stop
        new requests from matching prompt KV cached under the old weights."""
        self._record_swap(version)
        self._swaps += 1
        if not self.busy():
            self.llm.reset_prefix_cache()
        self.version = version
        self.engine.set_weight_version(str(version))

    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Prepare and swap in one go (on the engine thread)."""
        self.apply_weights(self.prepare_weights(list(tensors)), version)

    def _model(self) -> torch.nn.Module:
        return self.engine.model_executor.driver_worker.worker.model_runner.model

    def holds_memory_of(self, buf: bytearray) -> bool:
        """Whether any engine tensor lives inside `buf` (then it must never be reused). vLLM's
        loaders copy into their own tensors; this checks that instead of assuming it. Workers
        in other processes (tensor parallelism) cannot hold this process's memory."""
        if getattr(self.engine.model_executor, "driver_worker", None) is None:
            return False
        lo = torch.frombuffer(buf, dtype=torch.uint8).data_ptr() if len(buf) else 0
        hi = lo + len(buf)
        model = self._model()
        return any(lo <= t.data_ptr() < hi
                   for t in (*model.parameters(), *model.buffers()))

    # ------------------------------------------------ sleep mode (colocated placement, GPU)
    def sleep(self) -> None:
        """Frees the engine's GPU memory for the learner beside it: weights offloaded to host
        memory, KV cache discarded (vLLM sleep level 1). Only between requests."""
        if not self.asleep:
            assert not self.busy(), "sleep with requests in flight"
            self.llm.sleep(level=1)
            self.asleep = True

    def wake_up(self) -> None:
        """Weights back on the GPU and a fresh KV cache, before loading or generating."""
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def abort(self, request_ids: list[str]) -> None:
        self.engine.abort_request(request_ids)
        for r in request_ids:
            self.pending.pop(r, None)
