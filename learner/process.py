"""The learner process around the Trainer: sockets (rank 0 only), loop, metrics, checkpoints.

Every rank records spans of its phases (wait_batch, train_step with prepare / recompute /
fwd_bwd / optimizer inside, publish_weights, eval, checkpoint) to RUN_DIR/trace; rank 0 writes
one metrics line per step to RUN_DIR/metrics.jsonl and the same numbers to TensorBoard.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import zmq

from launch.runtime import gpu_memory_turn, heap_state, settle_heap
from learner.config import LearnerConfig
from learner.objective import PRESETS, ObjectiveConfig
from learner.trainer import Trainer, init_distributed, metrics_line
from protocol.auth import RunKeys
from protocol.messages import RolloutGroup
from protocol.sockets import SocketOptions, open_socket
from protocol.weights import BroadcastSettings
from tasks.config import TaskConfig
from tasks.problems import Problem
from telemetry.spans import now_ns, open_trace, record, span

log = logging.getLogger("dynamo.learner")


@dataclass(slots=True)
class LearnerSetup:
    cfg: LearnerConfig
    preset: str
    model_path: str
    run_dir: Path
    temperature: float
    max_tokens: int
    max_staleness: int
    allocator: str  # endpoints
    rollouts: str
    weights: str
    held_out: list[Problem]  # rendered in the actors' prompt format
    verifier: str
    max_model_len: int  # the actors' context: longer samples are refused at the intake
    task: TaskConfig | None = None  # verifier time limit and answer extraction
    keys: RunKeys | None = None
    max_message_bytes: int = 512 << 20
    broadcast: BroadcastSettings | None = None  # the broadcast weights backend
    colocated: bool = False  # actors share this device: hand back cached memory after a step


def objective_config(cfg: LearnerConfig, preset: str) -> ObjectiveConfig:
    import dataclasses

    return dataclasses.replace(PRESETS[preset], is_mode=cfg.is_mode, is_cap=cfg.is_cap,
                               mask_low=cfg.mask_low, mask_high=cfg.mask_high,
                               skip_zero_signal=cfg.skip_zero_signal,
                               comp_constant=cfg.comp_constant)


def run_learner(s: LearnerSetup) -> int:
    loop = LearnerLoop(s)
    settle_heap()  # start-up is over (the CLI turned the collector off for it)
    try:
        loop.run()
    finally:
        loop.close()
    return 0


class LearnerLoop:
    """One learner rank: take a batch (rank 0 pulls it, every rank gets it), train it,
    publish the weights, report progress, evaluate, log, checkpoint; until total_steps or a
    stop signal, then a final checkpoint. Rank 0 alone holds the sockets."""

    def __init__(self, s: LearnerSetup) -> None:
        self.s, cfg = s, s.cfg
        self.rank, self.world = init_distributed()
        self.clock_id = f"{socket.gethostname()}-learner{self.rank}-{os.getpid()}"
        open_trace(s.run_dir, f"learner{self.rank}", "learner", clock_id=self.clock_id)
        # beside a colocated engine: never while it measures the device's memory (the ranks
        # of this host build theirs together)
        self.on_shared_gpu = s.colocated and torch.cuda.is_available()
        ckpt_root = s.run_dir / "checkpoints"
        with span("init"), self.gpu_turn():
            self.trainer = Trainer(cfg, objective_config(cfg, s.preset), s.model_path,
                                   temperature=s.temperature)
            self.state = self.trainer.load(ckpt_root)  # optimizer state onto the device too
            if self.on_shared_gpu:
                torch.cuda.empty_cache()  # what the build cached goes back to the device
        self.step = int(self.state["step"]) if self.state else 0
        if self.state:
            log.info("resumed from %s at step %d (version %d)",
                     (ckpt_root / "LATEST").read_text(), self.step, self.trainer.version)
        self.stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop.set())
        self.intake = self.publisher = self.reporter = self.tokenizer = None
        self.ctx = self.auth = self.handshakes = self.alloc = self.metrics_f = self.writer = None
        if self.rank == 0:
            self._open_wire()

    def gpu_turn(self):
        """Colocated on a GPU: while this rank allocates (model build, each step), no engine
        on this host sizes its KV cache (launch.runtime.gpu_memory_turn)."""
        if not self.on_shared_gpu:
            return contextlib.nullcontext()
        return gpu_memory_turn(f"learner{self.rank}", exclusive=False)

    # ---------------------------------------------------------------- rank 0's sockets
    def _open_wire(self) -> None:
        """One ZeroMQ context and one authenticator (actor keys) for the rollout intake and
        the weights socket; a client socket to the allocator; metrics files."""
        from transformers import AutoTokenizer

        from learner.grant_record import GrantRecord
        from learner.intake import Bounds, Intake
        from learner.progress import ProgressReporter
        from protocol.weights import WeightPublisher
        from telemetry.scalars import ScalarWriter

        s, cfg, keys = self.s, self.s.cfg, self.s.keys
        self.tokenizer = AutoTokenizer.from_pretrained(s.model_path)
        self.ctx = zmq.Context()
        if keys is not None:
            from protocol.handshakes import HandshakeWatch
            from protocol.sockets import start_authenticator

            self.auth = start_authenticator(self.ctx, keys.actors)  # both servers: actors only
            self.handshakes = HandshakeWatch(self.ctx)
        bounds = Bounds(vocab_size=self.trainer.lm.config.vocab_size,
                        max_model_len=s.max_model_len,
                        grant_secret=keys.grant_secret if keys is not None else None)
        self.intake = Intake(s.rollouts, capacity=4 * cfg.prompts_per_step, bounds=bounds,
                             keys=keys, max_message_bytes=s.max_message_bytes, ctx=self.ctx,
                             handshakes=self.handshakes)
        self.intake.learner_version = self.trainer.version
        if self.state:
            if self.state.get("grants"):  # absent from checkpoints older than the record
                self.intake.restore(GrantRecord.from_dict(self.state["grants"]))
            self.intake.counters.update(Counter(self.state["counters"]))
        wsock = open_socket(self.ctx, zmq.ROUTER, s.weights, bind=True,
                            keys=keys.serve() if keys is not None else None,
                            options=SocketOptions(sndhwm=256,
                                                  max_message_bytes=s.max_message_bytes))
        if self.handshakes is not None:  # before the publisher's thread owns the socket
            self.handshakes.watch(wsock, "weights")
        try:
            self.publisher = WeightPublisher(wsock, broadcast=s.broadcast)
            if s.broadcast is not None:
                log.info("weights backend: broadcast (rendezvous %s:%d), ZeroMQ for catch-up",
                         s.broadcast.host, s.broadcast.port)
        except Exception as e:  # noqa: BLE001 - e.g. the rendezvous port is taken
            log.warning("weights backend broadcast cannot run here (%s): using ZeroMQ", e)
            self.publisher = WeightPublisher(wsock)
        self.alloc = open_socket(self.ctx, zmq.DEALER, s.allocator, bind=False,
                                 keys=keys.connect(keys.allocator) if keys is not None else None)
        self.reporter = ProgressReporter(self.alloc, self.intake, s.run_dir, self.clock_id)
        self.metrics_f = (s.run_dir / "metrics.jsonl").open("a")
        self.writer = ScalarWriter(s.run_dir, os.environ.get("DYNAMO_WANDB_PROJECT"),
                                   config={"preset": s.preset, **cfg.model_dump()})

    def close(self) -> None:
        if self.rank == 0:
            self.intake.close()
            self.publisher.close()
            self.metrics_f.close()
            self.writer.close()
            for sock in (self.alloc, self.publisher.sock):
                sock.close(linger=0)
            if self.handshakes is not None:
                self.handshakes.close()
            if self.auth is not None:
                self.auth.stop()
            self.ctx.term()
        if self.world > 1:
            try:  # ranks tear the group down together (a rank leaving early aborted another)
                dist.barrier()
            except Exception as e:  # a peer is already gone: nothing left to wait for
                log.warning("no barrier before teardown: %s", e)
        dist.destroy_process_group()

    # ---------------------------------------------------------------- the loop
    def run(self) -> None:
        cfg = self.s.cfg
        self.publish(check_replicas=False)
        self.heartbeat()
        self.t_start = time.time()
        if self.rank == 0 and self.step == 0 and cfg.eval_every and self.s.held_out:
            self.evaluate_at_start()
        self.t_done = now_ns()  # where the previous step's wall time ended
        while self.step < cfg.total_steps and not self.stop.is_set():
            t_iter = now_ns()
            groups = self.take_batch()
            t_got = now_ns()
            record("wait_batch", t_iter, t_got)
            if groups is None:  # stopping
                break
            self.train_publish_log(groups, t_iter, t_got)
        if self.step and (self.state is None or self.step != int(self.state["step"])):
            checkpoint(self.trainer, self.step, self.intake, self.s)  # final (also on SIGTERM)
        self.heartbeat()  # the final position and record

    def heartbeat(self) -> None:
        if self.reporter is not None:
            self.reporter.send(self.trainer.version, self.step)

    def publish(self, check_replicas: bool) -> bool:
        """All ranks: gather and publish the current weights (rank 0 sends them)."""
        trainer, chunk = self.trainer, int(self.s.cfg.weight_chunk_mib * (1 << 20))

        def consume(named) -> None:
            self.publisher.publish(trainer.version, named, total_bytes=trainer.weight_bytes(),
                                   chunk_bytes=chunk)

        with span("publish_weights", version=trainer.version):
            return trainer.for_each_weight(consume, check_replicas=check_replicas)

    def take_batch(self) -> list[RolloutGroup] | None:
        """Rank 0 takes the next batch from the intake; every rank gets it (None: stop)."""
        s, groups = self.s, None
        if self.rank == 0:
            groups = self.intake.take(s.cfg.prompts_per_step, self.trainer.version,
                                      s.max_staleness, on_wait=self.heartbeat, stop=self.stop)
            if s.max_staleness >= 1:
                # Async: report the take now, so the allocator issues the next step's work
                # while this one trains (generation overlaps training). In sync mode the
                # report waits for the new weights (after the step).
                self.heartbeat()
        box = [groups]
        if self.world > 1:
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def train_publish_log(self, groups: list[RolloutGroup], t_iter: int, t_got: int) -> None:
        cfg, trainer = self.s.cfg, self.trainer
        version0 = trainer.version
        with self.gpu_turn():
            stats = trainer.step(groups)
            if self.on_shared_gpu:
                # the step's activations back to the device, not kept in torch's cache: the
                # actor's engine wakes into that memory for the next batch
                torch.cuda.empty_cache()
        if self.intake is not None:
            self.intake.trained(groups)
            self.intake.learner_version = trainer.version  # before actors can hold it
        record_step_spans(t_got, now_ns(), stats, trainer.version)
        self.step += 1
        stats["time/wait_batch"] = (t_got - t_iter) / 1e9
        t_pub = time.perf_counter()
        if self.step % cfg.publish_every == 0 and not stats.get("skipped_step"):
            check = self.world > 1 and cfg.replica_check_every > 0 \
                and self.step % cfg.replica_check_every == 0
            agree = self.publish(check_replicas=check)
            if check:
                stats["dp/weights_identical"] = float(agree)
                if not agree:
                    log.error("data-parallel ranks hold different weights after step %d",
                              self.step)
        stats["time/publish"] = time.perf_counter() - t_pub
        extra: dict = {"trained_from_version": version0}
        if self.rank == 0:
            extra["queue/intake"] = self.intake.queue.qsize()
            self.intake.counters["consumed_samples"] += sum(g.n for g in groups)
            self.heartbeat()
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.s.held_out:
                extra.update(evaluate(trainer, self.tokenizer, self.s))
        if self.step % cfg.checkpoint_every == 0:
            stats["time/checkpoint"] = checkpoint(trainer, self.step, self.intake, self.s)
        t_end = now_ns()
        if self.rank == 0:
            self.log_step(groups, stats, extra, version0, t_end)
        self.t_done = t_end

    def log_step(self, groups: list[RolloutGroup], stats: dict, extra: dict, version0: int,
                 t_end: int) -> None:
        """Rank 0: the step's metrics line (and TensorBoard scalars) and its log line.
        Consecutive steps' wall times tile the run (writing the previous step's metrics
        included), so time/* plus "other" bookkeeping partition it."""
        wall_s = (t_end - self.t_done) / 1e9
        if self.handshakes is not None:
            extra.update(self.handshakes.flat())
        extra.update({"elapsed_s": time.time() - self.t_start, "step_wall_s": wall_s,
                      "idle/learner": stats["time/wait_batch"] / wall_s,
                      "throughput/train_tokens_per_s": stats.get("train_tokens", 0.0) / wall_s,
                      # start-up ran without the cyclic collector (launch.runtime): it is back
                      # on, with what start-up created frozen out of its generations
                      **heap_state()})
        rec = metrics_line(self.step, self.trainer.version, groups, stats,
                           self.intake.counters, extra, trained_from=version0)
        self.write_metrics(rec)
        log.info("step %d v%d reward %.3f zero-signal %.2f loss-tokens %d %s", self.step,
                 self.trainer.version, rec["reward/mean"], rec["zero_signal_frac"],
                 int(stats.get("train_tokens", 0)),
                 f"acc {extra['eval/acc']:.3f}" if "eval/acc" in extra else "")

    def evaluate_at_start(self) -> None:
        rec = {"step": 0, "version": self.trainer.version, "time": time.time(),
               "elapsed_s": 0.0}
        rec.update(evaluate(self.trainer, self.tokenizer, self.s))
        self.write_metrics(rec)
        log.info("step 0 held-out greedy accuracy %.3f, pass@1 %.3f", rec["eval/acc"],
                 rec["eval/pass1"])

    def write_metrics(self, rec: dict) -> None:
        self.metrics_f.write(json.dumps(rec) + "\n")
        self.metrics_f.flush()
        self.writer.write(rec)


def record_step_spans(start_ns: int, end_ns: int, stats: dict[str, float], version: int) -> None:
    """The train_step span and, inside it, its phases laid end to end from the durations
    Trainer.step measured (time/prepare, time/recompute, time/fwd_bwd, time/optimizer)."""
    record("train_step", start_ns, end_ns, version=version)
    t = start_ns
    for phase in ("prepare", "recompute", "fwd_bwd", "optimizer"):
        if f"time/{phase}" in stats:
            end = min(t + int(stats[f"time/{phase}"] * 1e9), end_ns)
            record(phase, t, end)
            t = end


def evaluate(trainer: Trainer, tokenizer, s: LearnerSetup) -> dict[str, float]:
    from learner.evaluate import evaluate_held_out

    t = time.perf_counter()
    with span("eval", version=trainer.version):
        res = evaluate_held_out(trainer.lm, tokenizer, s.held_out, s.verifier,
                                max_new_tokens=s.max_tokens, temperature=s.temperature,
                                k=trainer.cfg.eval_samples, task=s.task)
    res["time/eval"] = time.perf_counter() - t
    return res


def checkpoint(trainer: Trainer, step: int, intake, s: LearnerSetup) -> float:
    """Write a checkpoint (all ranks); returns the seconds it took."""
    counters = dict(intake.counters) if intake is not None else {}
    state = {"step": step, "version": trainer.version, "counters": counters,
             "grants": intake.record.to_dict() if intake is not None else None}
    t = time.perf_counter()
    with span("checkpoint", step=step):
        trainer.save(s.run_dir / "checkpoints", f"step{step:07d}", state, s.model_path,
                     extra_files=[s.run_dir / "allocator_state.pkl"])
    took = time.perf_counter() - t
    log.info("checkpoint step %d written in %.2fs", step, took)
    return took

