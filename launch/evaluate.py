"""`dynamo-rl eval`: score a model or a training checkpoint on benchmarks with vLLM.

Guarantees:
- Every problem of every benchmark gets exactly k samples (and one greedy completion with
  `--greedy`), submitted in one vLLM `generate` call so the engine schedules the whole
  workload; sampling is seeded per problem. On CPU the requests go in waves whose prompts fit
  one scheduler step (`prefill_waves`): vLLM's CPU build crashes when a seeded request's
  prefill is split over steps (it rewinds the generator, which CPU generators cannot do).
- A prompt that does not fit the context is never dropped silently: it scores 0 and is
  counted (`prompt_too_long`); so are verifier errors and timeouts.
- Prompts are built and completions decoded and checked the way actors do it for training
  rollouts (`tasks.prompts` with the config's task settings, `tokenizer.decode(...,
  skip_special_tokens=True)`, `tasks.scoring.Verifier`). The built-in `arithmetic` benchmark
  takes the task's format; files take it with the defaults of a math file
  (`resolved_prompt_format(task, "file")`), which is the training format for a file task.
- pass@k is the unbiased estimator of Chen et al. (2021); pass@1 is the mean over the k
  samples. The full report (per-problem counts included) goes to `--out`; a table and a
  one-line JSON summary go to stdout.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import math
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from launch.config import ConfigError, RunConfig, load_config
from tasks.problems import Problem, load_problem_file, load_task
from tasks.prompts import PromptFormat, prompt_token_ids, resolved_prompt_format
from tasks.scoring import Verifier
from tasks.verifiers import extract_boxed

log = logging.getLogger("dynamo.eval")


@dataclass(frozen=True, slots=True)
class BenchFormat:
    """Field names of a benchmark file; the first candidate present in the file is used."""

    prompt: tuple[str, ...]
    answer: tuple[str, ...]
    id: str = "id"


# Formats as the benchmarks are usually published (Qwen2.5-Math evaluation data, HF hubs).
FORMATS: dict[str, BenchFormat] = {
    "math500": BenchFormat(("problem",), ("answer",), id="unique_id"),
    "aime24": BenchFormat(("problem", "question"), ("answer",)),
    "aime25": BenchFormat(("problem", "question"), ("answer",)),
    "amc23": BenchFormat(("question", "problem"), ("answer",)),
    "minerva": BenchFormat(("problem", "question"), ("answer", "solution")),
    "olympiadbench": BenchFormat(("question", "problem"), ("final_answer", "answer")),
}
# Any other name: look for the usual fields (verl-style parquet files included).
GENERIC_FORMAT = BenchFormat(("problem", "question", "prompt"),
                             ("answer", "final_answer", "reward_model.ground_truth", "solution"))


@dataclass(slots=True)
class Benchmark:
    name: str
    source: str  # file path, or "built-in" for the config's held-out arithmetic set
    problems: list[Problem]
    verifier: str
    prompt_format: PromptFormat
    duplicates: int = 0  # rows dropped because their prompt and answer repeat an earlier row


@dataclass(slots=True)
class ProblemResult:
    correct: int = 0  # c of the n = k samples
    greedy: float | None = None
    tokens: int = 0
    truncated: int = 0
    too_long: bool = False


# ------------------------------------------------------------------------------- scoring math


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k samples drawn without replacement from n is correct), c correct.

    Unbiased estimator (Chen et al. 2021, eq. 1): pass@k = 1 - C(n-c, k) / C(n, k).
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


# ------------------------------------------------------------------------------- models


def resolve_model(path: str | Path) -> Path:
    """An HF model directory from a model dir, `stepN/hf`, `stepN`, `checkpoints/` or a run dir.

    A `checkpoints/` folder (or a run directory holding one) resolves through its LATEST
    pointer to `<tag>/hf`.
    """
    p = Path(path)
    for ckpts in (p, p / "checkpoints"):
        if (ckpts / "LATEST").is_file():
            p = ckpts / (ckpts / "LATEST").read_text().strip()
            break
    for cand in (p, p / "hf"):
        if (cand / "config.json").is_file():
            return cand
    raise ConfigError(f"--model {path}: not an HF model directory, a checkpoint (stepN or "
                      "stepN/hf) or a checkpoints folder / run directory with a LATEST pointer")


# ------------------------------------------------------------------------------- benchmarks


def _lookup(row: dict, name: str) -> Any:
    node: Any = row
    for part in name.split("."):
        if not isinstance(node, dict) or node.get(part) is None:
            return None
        node = node[part]
    return node


def _first_row(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file not found: {path}")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).slice(0, 1).to_pylist()
    else:
        with path.open() as f:
            rows = [json.loads(line) for line in f if line.strip()][:1]
    if not rows:
        raise ValueError(f"benchmark file {path} holds no rows")
    return rows[0]


def _pick(row: dict, names: tuple[str, ...], what: str, path: Path) -> str:
    for name in names:
        if _lookup(row, name) is not None:
            return name
    raise ValueError(f"{path}: no {what} field (looked for {', '.join(names)}; "
                     f"fields: {sorted(row)})")


def _answer(raw: str, field_name: str, is_list: bool, problem_id: str) -> str:
    if is_list:  # load_problem_file keeps str(value); a list of strings is its own literal
        return ", ".join(str(a) for a in ast.literal_eval(raw))
    if field_name == "solution":  # a worked solution: the answer is its last \boxed{}
        boxed = extract_boxed(raw)
        if boxed is None:
            raise ValueError(f"problem {problem_id}: solution holds no \\boxed{{}} answer")
        return boxed
    return raw


def load_benchmark(name: str, path: str | Path) -> tuple[list[Problem], int]:
    """(problems, duplicates dropped) of a benchmark file, fields found by its known format."""
    p = Path(path)
    fmt = FORMATS.get(name.lower().replace("-", "").replace("_", ""), GENERIC_FORMAT)
    row = _first_row(p)
    prompt_field = _pick(row, fmt.prompt, "prompt", p)
    answer_field = _pick(row, fmt.answer, "answer", p)
    is_list = isinstance(_lookup(row, answer_field), list)
    problems, seen, duplicates = [], set(), 0
    for q in load_problem_file(p, id_field=fmt.id, prompt_field=prompt_field,
                               answer_field=answer_field):
        q = Problem(q.id, q.prompt, _answer(q.answer, answer_field, is_list, q.id), q.difficulty)
        # Some published copies repeat every problem (verl's AIME parquet: 32 times).
        if (q.prompt, q.answer) in seen:
            duplicates += 1
            continue
        seen.add((q.prompt, q.answer))
        problems.append(q)
    return problems, duplicates


def benchmarks_of(cfg: RunConfig, specs: list[str]) -> list[Benchmark]:
    """`NAME=FILE` (math, verifier "math") or `arithmetic` (the config's held-out set)."""
    out = []
    for spec in specs:
        name, eq, path = spec.partition("=")
        if not eq:
            if name != "arithmetic":
                raise ConfigError(f"--bench {spec}: expected NAME=FILE (or `arithmetic`)")
            if cfg.task.kind != "arithmetic":
                raise ConfigError("--bench arithmetic: the config's task is not the built-in "
                                  "arithmetic task")
            out.append(Benchmark(name, "built-in", load_task(cfg.task)[1],
                                 cfg.task.verifier_name, resolved_prompt_format(cfg.task)))
            continue
        try:
            problems, dups = load_benchmark(name, path)
        except ValueError as e:
            raise ConfigError(f"--bench {spec}: {e}") from None
        out.append(Benchmark(name, path, problems, "math",
                             resolved_prompt_format(cfg.task, "file"), duplicates=dups))
    names = [b.name for b in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"--bench names must differ, got {names}")
    return out


# ------------------------------------------------------------------------------- the command


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `dynamo-rl eval` (the config positional and overrides are the CLI's)."""
    parser.add_argument("--model", help="HF model dir, checkpoint (RUN_DIR/checkpoints/stepN"
                        "[/hf]), checkpoints folder or run dir (LATEST); default: the config's")
    parser.add_argument("--bench", action="append", required=True, metavar="NAME=FILE",
                        help="benchmark jsonl/parquet (known NAMEs: " + ", ".join(FORMATS)
                        + "; others auto-detected), or `arithmetic` (the config's held-out "
                        "built-in set); repeatable")
    parser.add_argument("--k", type=int, default=32, help="samples per problem (default 32)")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--max-tokens", type=int,
                        help="most generated tokens (default: the config's actor.max_tokens; "
                        "context length is actor.max_model_len)")
    parser.add_argument("--greedy", action="store_true", help="also score greedy decoding")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes running the math verifier")
    parser.add_argument("--out", type=Path, help="write the full report (JSON) here")


@dataclass(slots=True)
class Requests:
    """An evaluation's vLLM requests, in submission order."""

    prompts: list[dict] = field(default_factory=list)
    params: list = field(default_factory=list)  # vllm.SamplingParams
    # (benchmark, problem, greedy) of each request
    owners: list[tuple[int, int, bool]] = field(default_factory=list)
    examples: dict[str, str] = field(default_factory=dict)  # benchmark -> first prompt as sent

    def add(self, ids: list[int], params: Any, owner: tuple[int, int, bool]) -> None:
        self.prompts.append({"prompt_token_ids": ids})
        self.params.append(params)
        self.owners.append(owner)


def cmd_eval(cfg: RunConfig, args: argparse.Namespace) -> int:
    from launch.runtime import model_path, settle_heap, setup_logging, start_up_without_gc

    start_up_without_gc()
    setup_logging("eval")
    max_tokens = check_arguments(cfg, args)
    model = resolve_model(args.model) if args.model else Path(model_path(cfg))
    benches = benchmarks_of(cfg, args.bench)

    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout: results only
    from actors.engine import Engine  # imports torch and vLLM: only once arguments are valid

    t0 = time.perf_counter()
    engine = Engine(str(model), **engine_options(cfg, args, max_tokens))
    settle_heap()
    results = [[ProblemResult() for _ in b.problems] for b in benches]
    reqs = build_requests(engine.tokenizer, benches, results, args, cfg.actor.max_model_len,
                          max_tokens)
    t1 = time.perf_counter()
    log.info("generating %d requests (%d samples) with %s", len(reqs.prompts),
             sum(p.n for p in reqs.params), model)
    outputs = generate(engine, reqs)
    t2 = time.perf_counter()
    counters = verify(cfg, args, benches, results, engine.tokenizer, reqs.owners, outputs)
    t3 = time.perf_counter()

    report = {"model": str(model), "k": args.k, "temperature": args.temperature,
              "top_p": args.top_p, "max_tokens": max_tokens,
              "max_model_len": cfg.actor.max_model_len, "seed": args.seed,
              "answer_extraction": cfg.task.answer_extraction,
              "benchmarks": {b.name: summarize(b, res, c, args.k, args.greedy)
                             for b, res, c in zip(benches, results, counters, strict=True)},
              "time_s": {"load": round(t1 - t0, 2), "generate": round(t2 - t1, 2),
                         "verify": round(t3 - t2, 2)}}
    if len(benches) > 1:
        report["average"] = average(report["benchmarks"])
    print(format_table(report), flush=True)
    if args.out is not None:
        write_full_report(args.out, report, reqs.examples, benches, results, args.k)
    print(json.dumps(report), flush=True)
    return 0


def check_arguments(cfg: RunConfig, args: argparse.Namespace) -> int:
    """The most generated tokens, once the arguments are known to be usable (before an
    engine is started)."""
    if args.k < 1:
        raise ConfigError(f"--k {args.k}: need at least one sample per problem")
    if args.workers < 1:
        raise ConfigError(f"--workers {args.workers}: need at least one verifier process")
    max_len = cfg.actor.max_model_len
    max_tokens = args.max_tokens or cfg.actor.max_tokens
    if max_tokens >= max_len:
        raise ConfigError(f"--max-tokens {max_tokens} leaves no room for the prompt in "
                          f"actor.max_model_len = {max_len}")
    return max_tokens


def engine_options(cfg: RunConfig, args: argparse.Namespace, max_tokens: int) -> dict[str, Any]:
    """`actors.engine.Engine` settings: the actors' engine, with this command's sampling."""
    a = cfg.actor
    return dict(max_model_len=a.max_model_len, max_tokens=max_tokens,
                temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                kv_cache_gib=a.kv_cache_gib, dtype=a.dtype,
                gpu_memory_utilization=a.gpu_memory_utilization,
                tensor_parallel_size=a.tensor_parallel_size, enforce_eager=a.enforce_eager)


def build_requests(tok, benches: list[Benchmark], results: list[list[ProblemResult]],
                   args: argparse.Namespace, max_len: int, max_tokens: int) -> Requests:
    """k samples per problem (and a greedy completion with --greedy); a prompt that does not
    fit the context is marked too long instead, and counted in a warning."""
    from vllm import SamplingParams

    reqs = Requests()
    for bi, b in enumerate(benches):
        for pi, q in enumerate(b.problems):
            ids = _prompt_ids(tok, b, q)
            if b.name not in reqs.examples:
                reqs.examples[b.name] = tok.decode(ids)
                log.info("%s: first prompt as sent: %r", b.name, reqs.examples[b.name])
            if len(ids) >= max_len:  # vLLM refuses it (and the whole batch with it)
                results[bi][pi].too_long = True
                continue
            # Per-problem seeds: a benchmark's samples do not depend on the other benchmarks.
            reqs.add(ids, SamplingParams(n=args.k, temperature=args.temperature,
                                         top_p=args.top_p, max_tokens=max_tokens,
                                         seed=args.seed + pi * args.k, detokenize=False),
                     (bi, pi, False))
            if args.greedy:
                reqs.add(ids, SamplingParams(n=1, temperature=0.0, max_tokens=max_tokens,
                                             detokenize=False), (bi, pi, True))
    for b, res in zip(benches, results, strict=True):
        if (n := sum(r.too_long for r in res)):
            log.warning("%s: %d of %d prompts do not fit actor.max_model_len = %d; they score 0",
                        b.name, n, len(res), max_len)
    return reqs


def _prompt_ids(tok, b: Benchmark, q: Problem) -> list[int]:
    try:
        ids = prompt_token_ids(tok, q.prompt, b.prompt_format)
    except ValueError as e:  # a chat template required and missing
        raise ConfigError(f"{b.name}: {e}") from None
    if not ids:
        raise ConfigError(f"{b.name}: the prompt of problem {q.id} tokenizes to nothing "
                          f"({b.prompt_format})")
    return ids


def generate(engine, reqs: Requests) -> list:
    """vLLM's outputs, one per request in order: one `generate` call on GPU, waves on CPU
    (`prefill_waves`)."""
    import torch

    llm = engine.llm
    if torch.cuda.is_available():
        return llm.generate(reqs.prompts, reqs.params, use_tqdm=sys.stderr.isatty())
    sched = llm.llm_engine.vllm_config.scheduler_config
    waves = prefill_waves([len(p["prompt_token_ids"]) * q.n for p, q in zip(
        reqs.prompts, reqs.params, strict=True)], sched.max_num_batched_tokens - sched.max_num_seqs)
    return [o for w in waves for o in llm.generate(reqs.prompts[w], reqs.params[w],
                                                   use_tqdm=False)]


def verify(cfg: RunConfig, args: argparse.Namespace, benches: list[Benchmark],
           results: list[list[ProblemResult]], tok, owners: list[tuple[int, int, bool]],
           outputs: list) -> list[Counter[str]]:
    """Scores every completion into `results` (correct samples, greedy score, tokens,
    truncations); returns each benchmark's verifier counters (errors, timeouts)."""
    # One job per (benchmark, sampled|greedy), items in request order.
    jobs: dict[tuple[int, bool], list[tuple[str, str]]] = {}
    slots: dict[tuple[int, bool], list[int]] = {}
    for (bi, pi, greedy), out in zip(owners, outputs, strict=True):
        r, answer = results[bi][pi], benches[bi].problems[pi].answer
        for c in out.outputs:
            jobs.setdefault((bi, greedy), []).append(
                (tok.decode(c.token_ids, skip_special_tokens=True), answer))
            slots.setdefault((bi, greedy), []).append(pi)
            if not greedy:
                r.tokens += len(c.token_ids)
                r.truncated += c.finish_reason == "length"
    counters: list[Counter[str]] = [Counter() for _ in benches]
    with Verifier(cfg.task.verifier_timeout_s, workers=args.workers,
                  answer_extraction=cfg.task.answer_extraction) as verifier:
        for (bi, greedy), items in jobs.items():
            before = Counter(verifier.counters)
            scores = verifier.score_many([(benches[bi].verifier, c, a) for c, a in items])
            for pi, s in zip(slots[bi, greedy], scores, strict=True):
                r = results[bi][pi]
                if greedy:
                    r.greedy = s
                else:
                    r.correct += int(s > 0)
            counters[bi].update(verifier.counters - before)
    return counters


def write_full_report(out: Path, report: dict[str, Any], examples: dict[str, str],
                      benches: list[Benchmark], results: list[list[ProblemResult]],
                      k: int) -> None:
    """The report with the prompt examples and each problem's counts (--out)."""
    full = dict(report, prompt_examples=examples, per_problem={
        b.name: [{"id": q.id, "correct": r.correct, "samples": k, "greedy": r.greedy,
                  "too_long": r.too_long} for q, r in zip(b.problems, res, strict=True)]
        for b, res in zip(benches, results, strict=True)})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(full, indent=1) + "\n")


def prefill_waves(prefill_tokens: list[int], budget: int) -> list[slice]:
    """Consecutive ranges of requests whose prefill tokens (prompt x samples) add up to at
    most `budget` (a request over it alone gets a wave of its own), so that every prefill of a
    wave is scheduled in one engine step, never split. `budget` leaves room for the decodes
    running when late prefills are admitted (the scheduler's token budget minus its most
    sequences)."""
    waves, start, used = [], 0, 0
    for i, t in enumerate(prefill_tokens):
        if i > start and used + t > budget:
            waves.append(slice(start, i))
            start, used = i, 0
        used += t
    if start < len(prefill_tokens):
        waves.append(slice(start, len(prefill_tokens)))
    return waves


def summarize(b: Benchmark, res: list[ProblemResult], counters: Counter[str], k: int,
              greedy: bool) -> dict[str, Any]:
    n = max(len(res), 1)
    samples = max(sum(k for r in res if not r.too_long), 1)
    return {
        "source": b.source, "verifier": b.verifier, "prompt_format": asdict(b.prompt_format),
        "problems": len(res),
        "duplicates_dropped": b.duplicates,
        # A prompt too long for the context counts as k failed samples.
        "pass@1": sum(r.correct / k for r in res) / n,
        "pass@k": sum(pass_at_k(k, r.correct, k) for r in res) / n,
        "greedy": sum(r.greedy or 0.0 for r in res) / n if greedy else None,
        "prompt_too_long": sum(r.too_long for r in res),
        "verifier_errors": counters["errors"] + counters["crashes"],
        "verifier_timeouts": counters["timeouts"],
        "truncated_frac": sum(r.truncated for r in res) / samples,
        "mean_response_tokens": sum(r.tokens for r in res) / samples,
    }


def average(benches: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """Unweighted mean over benchmarks (as papers report their "average" column)."""
    out: dict[str, float | None] = {}
    for key in ("pass@1", "pass@k", "greedy"):
        vals = [b[key] for b in benches.values()]
        out[key] = None if None in vals else sum(vals) / len(vals)
    return out


def format_table(report: dict[str, Any]) -> str:
    k = report["k"]
    head = ["benchmark", "problems", "pass@1", f"pass@{k}", "greedy", "too_long", "errors",
            "timeouts", "truncated"]

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    rows = [[name, str(b["problems"]), pct(b["pass@1"]), pct(b["pass@k"]), pct(b["greedy"]),
             str(b["prompt_too_long"]), str(b["verifier_errors"]), str(b["verifier_timeouts"]),
             f"{100 * b['truncated_frac']:.1f}%"] for name, b in report["benchmarks"].items()]
    if "average" in report:
        avg = report["average"]
        rows.append(["average", "", pct(avg["pass@1"]), pct(avg["pass@k"]), pct(avg["greedy"]),
                     "", "", "", ""])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in [head, *rows]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m launch.evaluate [CONFIG] --model M --bench ... [--section.field VALUE ...]`."""
    from launch.runtime import split_overrides

    parser = argparse.ArgumentParser(prog="dynamo-rl eval", description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", help="run config TOML (default: built-in defaults)")
    add_eval_arguments(parser)
    argv = sys.argv[1:] if argv is None else argv
    # `--model DIR` is this command's option, not an override of the [model] section.
    model, rest, i = [], [], 0
    while i < len(argv):
        take = 2 if argv[i] == "--model" else 1
        (model if argv[i].partition("=")[0] == "--model" else rest).extend(argv[i:i + take])
        i += take
    own, overrides = split_overrides(rest)
    args = parser.parse_args(model + own)
    try:
        return cmd_eval(load_config(args.config, overrides), args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"dynamo-rl eval: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
