"""`dynamo-rl`: one entry point whose subcommands start each component and the whole run."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from launch.config import ConfigError, RunConfig, dump_config, load_config
from launch.runtime import (
    ensure_run_keys,
    exit_process,
    gpu_memory_turn,
    model_path,
    run_keys,
    settle_heap,
    setup_logging,
    split_overrides,
    start_up_without_gc,
)


def cmd_check_config(cfg: RunConfig, args: argparse.Namespace) -> int:
    print(dump_config(cfg), end="")
    return 0


def cmd_keys(cfg: RunConfig, args: argparse.Namespace) -> int:
    ensure_run_keys(cfg.run_dir)
    print(f"run keys in {cfg.run_dir / 'keys'} (owner-only)")
    return 0


def cmd_build_model(cfg: RunConfig, args: argparse.Namespace) -> int:
    print(model_path(cfg))
    return 0


def cmd_allocator(cfg: RunConfig, args: argparse.Namespace) -> int:
    from allocator.service import AllocatorService, run_allocator
    from tasks.problems import load_task

    setup_logging("allocator")
    problems, _ = load_task(cfg.task)
    keys = run_keys(cfg, "allocator")
    net = cfg.network
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    service = AllocatorService(
        problems, cfg.allocator, rule=cfg.budget_rule, verifier=cfg.task.verifier_name,
        prompts_per_step=cfg.learner.prompts_per_step, max_staleness=cfg.max_staleness,
        updates_per_batch=cfg.learner.updates_per_batch, endpoint=net.bind(net.allocator_port),
        run_dir=cfg.run_dir, keys=keys)
    run_allocator(service)
    return 0


def cmd_actor(cfg: RunConfig, args: argparse.Namespace) -> int:
    import signal

    start_up_without_gc()  # until the engine is built

    # The engine's own process groups (gloo among its workers, all on this node) listen on
    # loopback, never on the cluster interface; the weight broadcast names its interface itself.
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    os.environ["VLLM_HOST_IP"] = "127.0.0.1"
    from launch.cores import pin_to

    # On the cores the launcher gave the engine from the start: the imports and the engine's
    # start-up then do not compete with the learner's on a small machine.
    pin_to(os.environ.get("VLLM_CPU_OMP_THREADS_BIND"))
    from actors.config import ONEDNN_CACHE_CAPACITY

    # before torch loads oneDNN (docs/GUARANTEES.md, "Bounded memory, measured")
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_CACHE_CAPACITY)
    from actors.worker import Actor, Endpoints

    setup_logging(f"actor{args.index}")
    path = model_path(cfg, progress=False)
    keys = run_keys(cfg, "actor")
    net = cfg.network
    ep = Endpoints(allocator=net.allocator, rollouts=net.rollouts, weights=net.weights,
                   weights_backend=net.weights_backend)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    sleep_s = colocated_sleep_s(cfg)
    # a colocated GPU engine measures the device's memory as it starts: alone on the host
    with (gpu_memory_turn(f"actor{args.index}", exclusive=True) if sleep_s is not None
          else contextlib.nullcontext()):
        actor = Actor(cfg.actor, path, ep, index=args.index, keys=keys,
                      max_message_bytes=net.max_message_mib << 20,
                      metrics_path=cfg.run_dir / f"metrics_actor{args.index}.jsonl",
                      run_dir=cfg.run_dir, task=cfg.task, sleep_when_idle_s=sleep_s)
    settle_heap()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: actor.stop.set())
    actor.run()
    return 0


def colocated_sleep_s(cfg: RunConfig) -> float | None:
    """Colocated placement on GPU: the actor's engine sleeps (frees its GPU memory) while
    the learner beside it trains; on CPU the two phases share the cores instead."""
    import torch

    if cfg.placement == "colocated" and torch.cuda.is_available():
        return cfg.actor.sleep_after_s
    return None


def cmd_learner(cfg: RunConfig, args: argparse.Namespace) -> int:
    start_up_without_gc()  # imports and model build; run_learner turns it back on
    setup_logging(f"learner{os.environ.get('RANK', '0')}")
    if os.environ.get("DYNAMO_CPU_AFFINITY"):  # set by the local launcher on CPU machines
        from launch.cores import pin_to

        pin_to(os.environ["DYNAMO_CPU_AFFINITY"])  # before torch's import
        import torch

        torch.set_num_threads(len(os.sched_getaffinity(0)))
    from learner.process import LearnerSetup, run_learner
    from tasks.problems import load_task
    from tasks.prompts import PromptFormat, render_problems, resolved_prompt_format

    _, held_out = load_task(cfg.task)
    path = model_path(cfg, progress=False)
    fmt = resolved_prompt_format(cfg.task)
    if held_out and fmt != PromptFormat():  # evaluated on the prompts the actors send
        from transformers import AutoTokenizer

        held_out = render_problems(AutoTokenizer.from_pretrained(path), held_out, fmt)
    keys = run_keys(cfg, "learner")
    net = cfg.network
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    from protocol.weights import BroadcastSettings

    setup = LearnerSetup(
        cfg=cfg.learner, preset=cfg.preset, model_path=path,
        run_dir=cfg.run_dir, temperature=cfg.actor.temperature, max_tokens=cfg.actor.max_tokens,
        max_staleness=cfg.max_staleness,
        allocator=net.allocator, rollouts=net.bind(net.rollout_port),
        weights=net.bind(net.weights_port),
        held_out=held_out, verifier=cfg.task.verifier_name, task=cfg.task, keys=keys,
        colocated=cfg.placement == "colocated",
        max_model_len=cfg.actor.max_model_len,
        max_message_bytes=net.max_message_mib << 20,
        broadcast=BroadcastSettings(
            host=net.learner_host or net.host, port=net.weights_group_port,
            bind_host=net.bind_host or net.host,
            timeout_s=net.broadcast_timeout_s,
            chunk_bytes=int(net.broadcast_chunk_mib * (1 << 20)))
        if net.weights_backend == "broadcast" else None)
    return run_learner(setup)


def cmd_learner_node(cfg: RunConfig, args: argparse.Namespace) -> int:
    from launch.node import run_learner_node

    return run_learner_node(args.config_args, ranks_here=args.ranks_here,
                            first_rank=args.first_rank, world=args.world, master=args.master)


def cmd_run(cfg: RunConfig, args: argparse.Namespace) -> int:
    from launch.local import run_local

    return run_local(cfg, resume=args.resume)


def cmd_profile(args: argparse.Namespace) -> int:
    from telemetry.report import profile_run

    run_dir = Path(args.run_dir)
    if not (run_dir / "metrics.jsonl").is_file() and not (run_dir / "trace").is_dir():
        print(f"dynamo-rl profile: {run_dir} holds no metrics.jsonl or trace/ (not a run "
              f"directory, or the run has not started)", file=sys.stderr)
        return 2
    profile_run(run_dir, window_s=args.window)
    return 0


# The service processes: finalising the modules of torch and vLLM at exit costs seconds
# (the allocator imports neither, but ends the same way)
EXIT_AT_ONCE = frozenset({"actor", "learner", "allocator", "eval"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dynamo-rl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, fn, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help,
                           epilog="Any config field can be overridden: --learner.lr 1e-6")
        p.add_argument("config", nargs="?", help="run config TOML (default: built-in defaults)")
        p.set_defaults(fn=fn)
        return p

    add("check-config", cmd_check_config, "validate a config and print it with every default")
    add("keys", cmd_keys, "create the run's CURVE keys in RUN_DIR/keys")
    add("build-model", cmd_build_model, "build (or find) the task's embedded model; print its "
        "path")
    add("allocator", cmd_allocator, "run the allocator service")
    p = add("actor", cmd_actor, "run one actor (vLLM engine)")
    p.add_argument("--index", type=int, default=0, help="actor index (seed offset, log name)")
    add("learner", cmd_learner, "run the learner (one rank; use torchrun for several)")
    p = add("learner-node", cmd_learner_node, "run the learner ranks of one cluster node "
            "(launch/cluster.sh)")
    p.add_argument("--ranks-here", type=int, required=True, help="learner ranks on this node")
    p.add_argument("--first-rank", type=int, required=True, help="global rank of the first")
    p.add_argument("--world", type=int, required=True, help="learner ranks on all nodes")
    p.add_argument("--master", required=True,
                   help="ADDRESS:PORT of learner rank 0's rendezvous store")
    p = add("run", cmd_run, "run allocator, actors and learner on this machine")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")
    from launch.evaluate import add_eval_arguments, cmd_eval  # light: no torch/vllm import

    p = add("eval", cmd_eval, "score a model or checkpoint on benchmark files with vLLM "
            "(pass@1 over k samples, pass@k)")
    add_eval_arguments(p)
    p = sub.add_parser("profile", help="throughput report of a finished or running run: "
                       "summary table, RUN_DIR/trace.json, RUN_DIR/profile/ (figures)")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--window", type=float, default=30.0,
                   help="seconds of the run shown in the timeline figure (the last ones)")
    p.set_defaults(fn=None)
    p = sub.add_parser("audit", help="check a run's exactly-once guarantees from the learner's "
                       "grant record, the allocator's ledger and the drop counters; exit 1 "
                       "on any violation")
    p.add_argument("run_dir", metavar="RUN_DIR")

    own, rest = split_overrides(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(own)
    if args.command in ("profile", "audit"):  # read a run directory, not a config
        if rest:
            parser.error(f"{args.command} takes no config overrides: {' '.join(rest)}")
        if args.command == "audit":
            from launch.audit import main as audit_main

            return audit_main(args.run_dir)
        return cmd_profile(args)
    try:
        if getattr(args, "resume", None):  # the run's own config, plus any overrides
            rest = ["--run_dir", args.resume, *rest]
            cfg = load_config(Path(args.resume) / "config.toml", rest)
        else:
            cfg = load_config(args.config, rest)
        args.config_args = [a for a in (args.config,) if a] + rest  # learner-node: for its ranks
        rc = args.fn(cfg, args) or 0
    except (ConfigError, FileNotFoundError) as e:
        print(f"dynamo-rl {args.command}: {e}", file=sys.stderr)
        return 2
    if args.command in EXIT_AT_ONCE and argv is None:
        exit_process(rc)  # a process of its own (not a caller's main(argv))
    return rc


if __name__ == "__main__":
    sys.exit(main())
