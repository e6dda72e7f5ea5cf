"""The run configuration: every component's config composed, read from TOML + overrides.

Every field is defined and defaulted once, in its component's config class. Invalid
configurations fail here, at start-up, with a message naming the field and the reason.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from actors.config import ActorConfig
from allocator.config import AllocatorConfig
from learner.config import LearnerConfig
from learner.presets import PRESET_TABLE, Preset, allocation_rule
from protocol.listen import resolve
from tasks.config import TaskConfig


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the field and the reason."""


class ModelConfig(BaseModel):
    """The policy model."""

    model_config = ConfigDict(extra="forbid")

    path: Path | None = Field(
        None, description="local HF model directory; None builds the task's embedded model "
        "(the math rehearsal's for task.kind = 'math-rehearsal', else the tiny arithmetic one)")
    cache_dir: Path = Field(
        Path(".cache/models"), description="where embedded models are built and reused")
    warm_start_steps: int | None = Field(
        None, ge=0, description="supervised steps of the embedded model's warm start (default: "
        "its own, launch/embedded_model.py or launch/rehearsal_model.py)")
    seed: int = Field(0, description="seed of the embedded model's init and warm start")

    @model_validator(mode="after")
    def _check_path(self) -> ModelConfig:
        if self.path is not None and not (Path(self.path) / "config.json").is_file():
            raise ValueError(f"model.path: {self.path} is not an HF model directory "
                             "(no config.json)")
        return self


class NetworkConfig(BaseModel):
    """Addresses of the run's sockets. Actors and the learner connect to these."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", description="default address of every service (one machine)")
    allocator_host: str | None = Field(
        None, description="address of the allocator's node (default: host)")
    learner_host: str | None = Field(
        None, description="address of learner rank 0's node (default: host)")
    bind_host: str | None = Field(
        None, description="address (or interface name) services bind, rendezvous included "
        "(default: host); launch/cluster.sh sets each node's own address")
    allocator_port: int = Field(5710, ge=1, le=65535, description="allocator ROUTER port")
    rollout_port: int = Field(5711, ge=1, le=65535, description="learner rollout PULL port")
    weights_port: int = Field(5712, ge=1, le=65535, description="learner weights ROUTER port")
    weights_backend: Literal["zmq", "broadcast"] = Field(
        "zmq", description="how weights reach actors: zmq (one CURVE transfer per actor from the "
        "learner) or broadcast (one copy down a pipelined chain of actors in a gloo/NCCL process "
        "group; control stays on zmq, which also carries catch-up and fallback)")
    weights_group_port: int = Field(
        5713, ge=1, le=65535, description="broadcast backend: the learner's rendezvous port")
    broadcast_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="broadcast backend: forming a group and each transfer "
        "time out after this (then the group is rebuilt without the dead members)")
    broadcast_chunk_mib: float = Field(
        4.0, gt=0, description="broadcast backend: chunk of the pipelined chain")
    curve: bool = Field(True, description="authenticate and encrypt with CURVE (run's keys)")
    max_message_mib: int = Field(512, ge=1, description="largest accepted message")

    def bind(self, port: int) -> str:
        return f"tcp://{resolve(self.bind_host or self.host)}:{port}"

    @property
    def allocator(self) -> str:
        return f"tcp://{self.allocator_host or self.host}:{self.allocator_port}"

    @property
    def rollouts(self) -> str:
        return f"tcp://{self.learner_host or self.host}:{self.rollout_port}"

    @property
    def weights(self) -> str:
        return f"tcp://{self.learner_host or self.host}:{self.weights_port}"


COLOCATED_GPU_SHARE = 0.4  # actor.gpu_memory_utilization's default with placement = colocated


class RunConfig(BaseModel):
    """One training run."""

    model_config = ConfigDict(extra="forbid")

    run_dir: Path = Field(Path("runs/default"), description="logs, metrics, checkpoints, keys")
    preset: Preset = Field("dynamo", description="grpo | dynamo | alloc-only | modulation-only")
    mode: Literal["async", "sync"] = Field(
        "async", description="sync: actors wait for each new version (max_staleness 0)")
    placement: Literal["disaggregated", "colocated"] = Field(
        "disaggregated", description="disaggregated: actors and learner on their own devices "
        "(on one CPU machine: its cores split between them), overlapping generation and "
        "training; colocated: they share every device and take turns (implies mode = sync)")
    task: TaskConfig = Field(default_factory=TaskConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    allocator: AllocatorConfig = Field(default_factory=AllocatorConfig)
    actor: ActorConfig = Field(default_factory=ActorConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    network: NetworkConfig = Field(default_factory=NetworkConfig)

    @model_validator(mode="after")
    def _check_cross(self) -> RunConfig:
        if self.actor.max_tokens >= self.actor.max_model_len:
            raise ValueError(f"actor.max_tokens = {self.actor.max_tokens} leaves no room for the "
                             f"prompt in actor.max_model_len = {self.actor.max_model_len}")
        if self.placement == "colocated" and \
                "gpu_memory_utilization" not in self.actor.model_fields_set:
            # on GPU the engine wakes beside the learner's weights and optimizer state: vLLM
            # checks at start-up that its share is free, so it must not ask for most of it
            self.actor.gpu_memory_utilization = COLOCATED_GPU_SHARE
        tp = self.actor.tensor_parallel_size
        if tp > 1 and self.actor.weight_loader != "vllm_api":
            raise ValueError(f"actor.tensor_parallel_size = {tp} needs actor.weight_loader = "
                             f"\"vllm_api\": the packed swap and the in-process reload reach one "
                             f"in-process worker only")
        beat, silence = self.actor.heartbeat_s, self.allocator.actor_silence_s
        if silence < 3 * beat:
            raise ValueError(f"allocator.actor_silence_s = {silence} is under three of the actors' "
                             f"heartbeats (actor.heartbeat_s = {beat}): a live actor would be "
                             f"taken for dead between two of them")
        u = self.learner.updates_per_batch
        if self.max_staleness and self.max_staleness < u:
            raise ValueError(
                f"allocator.max_staleness = {self.max_staleness} is below the {u} optimizer "
                f"updates (policy versions) one batch takes (learner.prompts_per_step / "
                f"learner.mini_batch_prompts x learner.ppo_epochs): every group generated "
                f"during a batch would be dropped as stale; use a multiple of {u}, or mode = "
                f"\"sync\"")
        if self.learner.comp_constant is not None and not PRESET_TABLE[self.preset][1]:
            raise ValueError(f"learner.comp_constant replaces β_comp of the advantage modulation, "
                             f"which preset {self.preset!r} does not apply; use dynamo or "
                             f"modulation-only")
        ports = [self.network.allocator_port, self.network.rollout_port, self.network.weights_port]
        if self.network.weights_backend == "broadcast":
            ports.append(self.network.weights_group_port)
        if len(set(ports)) != len(ports):
            raise ValueError(f"network ports must differ, got {ports}")
        return self

    @property
    def budget_rule(self) -> str:
        return self.allocator.rule or allocation_rule(self.preset)

    @property
    def max_staleness(self) -> int:
        synchronous = self.mode == "sync" or self.placement == "colocated"
        return 0 if synchronous else self.allocator.max_staleness


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`--learner.lr 1e-6 --preset grpo` (or `--learner.lr=1e-6`) -> nested dict.

    Values are read as TOML literals (numbers, booleans, arrays, quoted strings); anything
    that is not a TOML literal is taken as a plain string.
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"override {arg!r}: expected --section.field VALUE")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"override --{key}: missing value")
            value = args[i + 1]
            i += 1
        i += 1
        try:
            parsed = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value
        node = out
        parts = key.replace("-", "_").split(".") if "." in key else [key.replace("-", "_")]
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = parsed
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v
    return base


def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(run config)"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  {field}: {msg}")
    return "invalid configuration:\n" + "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a TOML run config (optional), apply overrides, validate. Raises ConfigError."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {p} is not valid TOML: {e}") from e
    _merge(data, parse_overrides(overrides or []))
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e)) from None


def dump_config(cfg: RunConfig) -> str:
    """TOML text of a config (written into the run directory so a run can be resumed)."""
    return _to_toml(cfg.model_dump(mode="json", exclude_none=True))


def _to_toml(d: dict[str, Any], prefix: str = "") -> str:
    scalars, tables = [], []
    for k, v in d.items():
        if isinstance(v, dict):
            tables.append((k, v))
        else:
            scalars.append(f"{k} = {_toml_value(v)}")
    out = ("\n".join(scalars) + "\n") if scalars else ""
    for k, v in tables:
        name = f"{prefix}{k}"
        out += f"\n[{name}]\n" + _to_toml(v, prefix=name + ".")
    return out


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return '"' + "".join(_toml_char(c) for c in str(v)) + '"'


_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _toml_char(c: str) -> str:
    # TOML basic strings forbid raw control characters (a newline in a path, say).
    if c in _TOML_ESCAPES:
        return _TOML_ESCAPES[c]
    return f"\\u{ord(c):04x}" if c < " " or c == "\x7f" else c
