"""The learner process around the Trainer: sockets (rank 0 only), loop, metrics, checkpoints.

Every rank records spans of its phases (wait_batch, train_step with prepare / recompute /
fwd_bwd / optimizer inside, publish_weights, eval, checkpoint) to RUN_DIR/trace; rank 0 writes
one metrics line per step to RUN_DIR/metrics.jsonl and the same numbers to TensorBoard.
"""

from __future__ import annotations

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

import torch.distributed as dist
import zmq

from learner.config import LearnerConfig
from learner.objective import PRESETS, ObjectiveConfig
from learner.trainer import Trainer, init_distributed, metrics_line
from protocol.auth import RunKeys
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


def objective_config(cfg: LearnerConfig, preset: str) -> ObjectiveConfig:
    import dataclasses

    return dataclasses.replace(PRESETS[preset], is_mode=cfg.is_mode, is_cap=cfg.is_cap,
                               mask_low=cfg.mask_low, mask_high=cfg.mask_high,
                               skip_zero_signal=cfg.skip_zero_signal)


def run_learner(s: LearnerSetup) -> int:
    rank, world = init_distributed()
    cfg = s.cfg
    clock_id = f"{socket.gethostname()}-learner{rank}-{os.getpid()}"
    open_trace(s.run_dir, f"learner{rank}", "learner", clock_id=clock_id)
    with span("init"):
        trainer = Trainer(cfg, objective_config(cfg, s.preset), s.model_path,
                          temperature=s.temperature)
    ckpt_root = s.run_dir / "checkpoints"
    state = trainer.load(ckpt_root)
    step = int(state["step"]) if state else 0
    counters: Counter[str] = Counter(state["counters"]) if state else Counter()
    if state:
        log.info("resumed from %s at step %d (version %d)",
                 (ckpt_root / "LATEST").read_text(), step, trainer.version)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    intake = publisher = alloc = ctx = tokenizer = reporter = None
    metrics_f = writer = None
    if rank == 0:
        from transformers import AutoTokenizer

        from learner.grant_record import GrantRecord
        from learner.intake import Bounds, Intake
        from learner.progress import ProgressReporter
        from protocol.weights import WeightPublisher
        from telemetry.scalars import ScalarWriter

        tokenizer = AutoTokenizer.from_pretrained(s.model_path)
        bounds = Bounds(vocab_size=trainer.lm.config.vocab_size, max_model_len=s.max_model_len,
                        grant_secret=s.keys.grant_secret if s.keys is not None else None)
        intake = Intake(s.rollouts, capacity=4 * cfg.prompts_per_step, bounds=bounds,
                        keys=s.keys, max_message_bytes=s.max_message_bytes)
        intake.learner_version = trainer.version
        if state:
            if state.get("grants"):  # absent from checkpoints older than the record
                intake.restore(GrantRecord.from_dict(state["grants"]))
            intake.counters.update(counters)
        ctx = zmq.Context()
        if s.keys is not None:
            from protocol.sockets import start_authenticator

            auth = start_authenticator(ctx, s.keys.actors)  # the weights socket: actors only
        wsock = open_socket(ctx, zmq.ROUTER, s.weights, bind=True,
                            keys=s.keys.serve() if s.keys is not None else None,
                            options=SocketOptions(sndhwm=256,
                                                  max_message_bytes=s.max_message_bytes))
        try:
            publisher = WeightPublisher(wsock, broadcast=s.broadcast)
            if s.broadcast is not None:
                log.info("weights backend: broadcast (rendezvous %s:%d), ZeroMQ for catch-up",
                         s.broadcast.host, s.broadcast.port)
        except Exception as e:  # noqa: BLE001 - e.g. the rendezvous port is taken
            log.warning("weights backend broadcast cannot run here (%s): using ZeroMQ", e)
            publisher = WeightPublisher(wsock)
        alloc = open_socket(ctx, zmq.DEALER, s.allocator, bind=False,
                            keys=s.keys.connect(s.keys.allocator) if s.keys is not None else None)
        reporter = ProgressReporter(alloc, intake, s.run_dir, clock_id)
        metrics_f = (s.run_dir / "metrics.jsonl").open("a")
        writer = ScalarWriter(s.run_dir, os.environ.get("DYNAMO_WANDB_PROJECT"),
                              config={"preset": s.preset, **cfg.model_dump()})

    def publish(check_replicas: bool) -> bool:
        """All ranks: gather and publish the current weights (rank 0 sends them)."""
        def consume(named) -> None:
            publisher.publish(trainer.version, named, total_bytes=trainer.weight_bytes(),
                              chunk_bytes=int(cfg.weight_chunk_mib * (1 << 20)))

        with span("publish_weights", version=trainer.version):
            return trainer.for_each_weight(consume, check_replicas=check_replicas)

    publish(check_replicas=False)
    def heartbeat() -> None:
        if reporter is not None:
            reporter.send(trainer.version, step)

    heartbeat()

    def write_metrics(rec: dict) -> None:
        metrics_f.write(json.dumps(rec) + "\n")
        metrics_f.flush()
        writer.write(rec)

    t_start = time.time()
    if rank == 0 and step == 0 and cfg.eval_every and s.held_out:
        rec = {"step": 0, "version": trainer.version, "time": time.time(), "elapsed_s": 0.0}
        rec.update(evaluate(trainer, tokenizer, s))
        write_metrics(rec)
        log.info("step 0 held-out greedy accuracy %.3f, pass@1 %.3f", rec["eval/acc"],
                 rec["eval/pass1"])
    t_done = now_ns()  # where the previous step's wall time ended
    try:
        while step < cfg.total_steps and not stop.is_set():
            t_iter = now_ns()
            groups = None
            if rank == 0:
                assert intake is not None
                groups = intake.take(cfg.prompts_per_step, trainer.version, s.max_staleness,
                                     on_wait=heartbeat, stop=stop)
                if s.max_staleness >= 1:
                    # Async: report the take now, so the allocator issues the next step's
                    # work while this one trains (generation overlaps training). In sync mode
                    # the report waits for the new weights (after the step).
                    heartbeat()
            box = [groups]
            if world > 1:
                dist.broadcast_object_list(box, src=0)
            groups = box[0]
            t_got = now_ns()
            record("wait_batch", t_iter, t_got)
            if groups is None:  # stopping
                break
            version0 = trainer.version
            stats = trainer.step(groups)
            if intake is not None:
                intake.trained(groups)
                intake.learner_version = trainer.version  # before actors can hold it
            record_step_spans(t_got, now_ns(), stats, trainer.version)
            step += 1
            stats["time/wait_batch"] = (t_got - t_iter) / 1e9
            t_pub = time.perf_counter()
            if step % cfg.publish_every == 0 and not stats.get("skipped_step"):
                check = world > 1 and cfg.replica_check_every > 0 \
                    and step % cfg.replica_check_every == 0
                agree = publish(check_replicas=check)
                if check:
                    stats["dp/weights_identical"] = float(agree)
                    if not agree:
                        log.error("data-parallel ranks hold different weights after step %d",
                                  step)
            stats["time/publish"] = time.perf_counter() - t_pub
            extra: dict = {"trained_from_version": version0}
            if rank == 0:
                assert intake is not None and publisher is not None
                extra["queue/intake"] = intake.queue.qsize()
                intake.counters["consumed_samples"] += sum(g.n for g in groups)
                heartbeat()
                if cfg.eval_every and step % cfg.eval_every == 0 and s.held_out:
                    extra.update(evaluate(trainer, tokenizer, s))
            if step % cfg.checkpoint_every == 0:
                stats["time/checkpoint"] = checkpoint(trainer, step, intake, s)
            t_end = now_ns()
            if rank == 0:
                # Consecutive steps' wall times tile the run (writing the previous step's
                # metrics included), so time/* plus "other" bookkeeping partition it.
                wall_s = (t_end - t_done) / 1e9
                extra.update({"elapsed_s": time.time() - t_start, "step_wall_s": wall_s,
                              "idle/learner": stats["time/wait_batch"] / wall_s,
                              "throughput/train_tokens_per_s":
                              stats.get("train_tokens", 0.0) / wall_s})
                rec = metrics_line(step, trainer.version, groups, stats, intake.counters, extra,
                                   trained_from=version0)
                write_metrics(rec)
                log.info("step %d v%d reward %.3f zero-signal %.2f loss-tokens %d %s", step,
                         trainer.version, rec["reward/mean"], rec["zero_signal_frac"],
                         int(stats.get("train_tokens", 0)),
                         f"acc {extra['eval/acc']:.3f}" if "eval/acc" in extra else "")
            t_done = t_end
        if step and (state is None or step != int(state["step"])):
            checkpoint(trainer, step, intake, s)  # final (also on SIGTERM)
        heartbeat()  # the final position and record
    finally:
        if rank == 0:
            assert intake is not None and publisher is not None
            intake.close()
            publisher.close()
            if metrics_f:
                metrics_f.close()
                writer.close()
            for sock in (alloc, publisher.sock):
                sock.close(linger=0)
            if s.keys is not None:
                auth.stop()
            ctx.term()
        if world > 1:
            try:  # ranks tear the group down together (a rank leaving early aborted another)
                dist.barrier()
            except Exception as e:  # a peer is already gone: nothing left to wait for
                log.warning("no barrier before teardown: %s", e)
        dist.destroy_process_group()
    return 0


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
                                task=s.task)
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

