"""One merge across many processes or nodes, coordinated through the shared filesystem only.

Every rank builds the same plan (``build_plan`` is deterministic) and takes a
deterministic, byte-balanced share of the output tensors (largest first, into
the least-loaded rank). All ranks write into the same staged shard files at
their planned offsets, so the output is byte-identical to a single-process
merge for any number of ranks and ``--n_process``.

The staging directory ``.{output}.llm_merge-dist-{plan hash}`` sits beside the
output; its name depends only on the resolved config and plan, so every rank
finds it without talking to the others. Files in it:

* ``shards-created``: written (atomically, by rename) by rank 0 after it has
  created every shard with O_CREAT|O_EXCL; holds the plan hash and a fresh run
  token. Other ranks write nothing before it exists.
* ``journal-{rank}-{id}.jsonl``: one line per written tensor (name, slot, crc32
  of its bytes), read by ``--resume`` to skip tensors whose bytes still verify.
* ``rank-{r}.done``: plan hash + run token, written after rank r's tensors are
  written and fsynced; ``rank-{r}.failed``: the error of a failed rank (and the token it worked for).

Rank 0 merges its own share, waits for every ``rank-{r}.done`` of the current
token (``--dist_timeout``), then removes the bookkeeping files, verifies,
writes the index, config files and merge_config.json, and renames the
directory into place. On any failure (its own, a ``.failed`` marker, the
timeout, SIGTERM) it removes the staging directory and nothing is published.
The other ranks stay until rank 0 has published (exit 0) or aborted (exit 1).

Liveness: every rank rewrites ``rank-{r}`` in the heartbeat directory
``.{output}.llm_merge-heartbeat-{plan hash}`` (beside the staging directory, not
in it, so that no heartbeat can land in the published output) from a daemon
thread, at least every ``HEARTBEAT_SECONDS``. An observer records, on its own
monotonic clock, when it last saw a rank's file change (no remote timestamp is
compared, so clock skew between nodes does not matter). Rank 0, while waiting,
aborts as above once a pending rank's file has not changed for
``--dist_heartbeat_timeout`` (a rank that never beat gets that grace from when
rank 0 began waiting). The other ranks, while waiting for the shards or for the
publish, exit 1 once rank 0's file has not changed for as long; they leave the
staging directory as it is, for ``--resume`` (without it, the next run's rank 0
discards it). Rank 0 removes the heartbeat directory when it finishes or aborts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import json
import logging
import os
import signal
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from llm_merge.config.options import MergeConfig
from llm_merge.errors import MergeError
from llm_merge.io import writer
from llm_merge.io.shards import allocate
from llm_merge.io.signals import stop_signals_raise
from llm_merge.run.heartbeat import Silence, beating, presumed_dead
from llm_merge.run.journal import JournalingFactory, verified_tensors
from llm_merge.run.pool import run_tasks
from llm_merge.run.rank_files import fsync_files, identity, read_json, remove_directory, unlink, write_json_atomically

log = logging.getLogger(__name__)


STAGING_TAG = ".llm_merge-dist-"


HEARTBEAT_TAG = ".llm_merge-heartbeat-"


SHARDS_CREATED = "shards-created"


POLL_SECONDS = 0.25


#: Options that change neither the plan nor the output bytes (left out of the plan hash).
_RUN_ONLY = ("rank", "world_size", "resume", "dist_timeout", "dist_heartbeat_timeout", "n_process", "quiet", "overwrite")


#: Options that merge_config.json records at their defaults (so that it matches a single-process merge).
RANK_OPTIONS = ("rank", "world_size", "resume", "dist_timeout", "dist_heartbeat_timeout")


#: Test hook: ``start`` (heartbeat running, before the shards exist) or ``waiting`` (own share done)
#: makes a rank SIGKILL itself at that point.
_KILL_AT_ENV = "LLM_MERGE_TEST_KILL_AT"




@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    source: str


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name, "").strip()
    return int(value) if value.lstrip("-").isdigit() else None


def context(cfg: MergeConfig) -> Optional[DistContext]:
    """This process's rank and the world size, or None for the ordinary single-process merge.

    Sources, first match wins: ``--rank/--world_size``; paddle.distributed.launch
    (PADDLE_TRAINER_ID / PADDLE_TRAINERS_NUM); an srun step (SLURM_PROCID /
    SLURM_STEP_NUM_TASKS, else SLURM_NTASKS); a Slurm job array (SLURM_ARRAY_TASK_ID -
    SLURM_ARRAY_TASK_MIN / SLURM_ARRAY_TASK_COUNT). A world of 1 runs the
    single-process path unless ``--rank/--world_size`` or ``--resume`` was given.
    """
    if cfg.world_size is not None:
        return DistContext(int(cfg.rank), int(cfg.world_size), "--rank/--world_size")
    found = None
    paddle_rank, paddle_size = _env_int("PADDLE_TRAINER_ID"), _env_int("PADDLE_TRAINERS_NUM")
    slurm_rank = _env_int("SLURM_PROCID")
    slurm_size = _env_int("SLURM_STEP_NUM_TASKS") or _env_int("SLURM_NTASKS")
    array_id, array_min, array_count = (_env_int(f"SLURM_ARRAY_TASK_{k}") for k in ("ID", "MIN", "COUNT"))
    if paddle_rank is not None and paddle_size:
        found = DistContext(paddle_rank, paddle_size, "PADDLE_TRAINER_ID/PADDLE_TRAINERS_NUM")
    elif slurm_rank is not None and slurm_size and slurm_size > 1:
        found = DistContext(slurm_rank, slurm_size, "SLURM_PROCID/SLURM_STEP_NUM_TASKS")
    elif array_id is not None and array_count and array_count > 1:
        found = DistContext(array_id - (array_min or 0), array_count, "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT")
    if found is not None and not 0 <= found.rank < found.world_size:
        raise MergeError(f"rank {found.rank} from {found.source} is out of range [0, {found.world_size})")
    if found is not None and found.world_size > 1:
        return found
    if cfg.resume:
        return found or DistContext(0, 1, "single process with --resume")
    return None


# -- what every rank agrees on without talking -------------------------------------------
def plan_hash(cfg: MergeConfig, plan: Any, world_size: int) -> str:
    """SHA-256 of the resolved options, the world size, the output layout and the inputs' identity."""
    options = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _RUN_ONLY}
    options["model_path_list"] = [os.path.realpath(p) for p in cfg.model_path_list]
    options["base_model_path"] = os.path.realpath(cfg.base_model_path) if cfg.base_model_path else None
    options["output_path"] = os.path.realpath(cfg.output_path)
    digest = hashlib.sha256(json.dumps({"options": options, "world_size": world_size}, sort_keys=True).encode())
    for shard in plan.shards:
        digest.update(json.dumps([shard.file, shard.size, hashlib.sha256(shard.header).hexdigest()]).encode())
    files = set()
    for task in plan.tasks:
        inputs = [*task.inputs, *([task.base] if task.base is not None else [])]
        files.update(str(i.file) for i in inputs)
        digest.update(json.dumps([task.name, task.out.file, task.out.start, task.out.dtype,
                                  [[str(i.file), i.dtype, i.start, i.nbytes] for i in inputs]]).encode())
    for name in sorted(files):
        stat = os.stat(name)
        digest.update(json.dumps([name, stat.st_size, stat.st_mtime_ns]).encode())
    return digest.hexdigest()


def assign(tasks: Sequence[Any], world_size: int) -> list[list[int]]:
    """Task indices per rank: largest (input + output bytes) first, each into the least-loaded rank."""
    order = sorted(range(len(tasks)), key=lambda i: (-(tasks[i].in_bytes + tasks[i].out_bytes), i))
    loads = [(0, rank) for rank in range(world_size)]
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for index in order:
        load, rank = heapq.heappop(loads)
        shares[rank].append(index)
        heapq.heappush(loads, (load + tasks[index].in_bytes + tasks[index].out_bytes, rank))
    return [sorted(share) for share in shares]


def staging_path(output: Path, digest: str) -> Path:
    return output.parent / f".{output.name}{STAGING_TAG}{digest[:20]}"


def heartbeat_path(output: Path, digest: str) -> Path:
    return output.parent / f".{output.name}{HEARTBEAT_TAG}{digest[:20]}"


def _test_kill_at(phase: str) -> None:
    if os.environ.get(_KILL_AT_ENV) == phase:
        os.kill(os.getpid(), signal.SIGKILL)


# -- one rank's share -----------------------------------------------------------------------
def run_share(cfg: MergeConfig, plan: Any, factory: Any, ctx: DistContext, staging: Path, resume: bool) -> None:
    """Merge this rank's tensors into the staged shards, journal them, and fsync."""
    mine = [plan.tasks[i] for i in assign(plan.tasks, ctx.world_size)[ctx.rank]]
    todo = mine
    if resume:
        reused = verified_tensors(staging, mine)
        todo = [t for t in mine if t.name not in reused]
        log.info("rank %d: resumed %d tensors (%.2f GB) verified from the journal; %d to merge",
                 ctx.rank, len(reused), sum(t.out_bytes for t in mine if t.name in reused) / 1e9, len(todo))
    started = time.perf_counter()
    run_tasks(todo, JournalingFactory(factory.bind(staging), staging, ctx.rank), cfg.n_process, cfg.quiet, f"rank {ctx.rank}",
              cfg.start_method)
    fsync_files([staging / f for f in sorted({t.out.file for t in mine})])
    log.info("rank %d/%d: merged %d of %d tensors (%.2f GB) in %.1f s", ctx.rank, ctx.world_size, len(todo), len(plan.tasks),
             sum(t.out_bytes for t in todo) / 1e9, time.perf_counter() - started)


# -- rank 0 --------------------------------------------------------------------------------
def _shards_intact(staging: Path, shards: Sequence[Any]) -> bool:
    for shard in shards:
        path = staging / shard.file
        try:
            if path.stat().st_size != shard.size:
                return False
            with open(path, "rb") as handle:
                if handle.read(len(shard.header)) != shard.header:
                    return False
        except OSError:
            return False
    return True


def _create_shards_exclusively(staging: Path, shards: Sequence[Any]) -> None:
    for shard in shards:
        path = staging / shard.file
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as exc:
            raise MergeError(f"{path}: cannot create output shard: {exc.strerror}") from exc
        try:
            os.pwrite(fd, shard.header, 0)
            allocate(fd, shard.size)
            os.fsync(fd)
        except OSError as exc:
            raise MergeError(f"{path}: cannot create output shard: {exc.strerror}") from exc
        finally:
            os.close(fd)


def _prepare(staging: Path, plan: Any, digest: str, resume: bool, world_size: int) -> str:
    """Rank 0: (re)create the shards unless resuming intact ones; publish a fresh run token."""
    marker = staging / SHARDS_CREATED
    if resume and marker.exists() and _shards_intact(staging, plan.shards):
        log.info("rank 0: resuming in %s", staging)
        for item in staging.glob("rank-*.done"):
            unlink(item)
    else:
        if marker.exists():
            log.warning("rank 0: discarding %s left by an interrupted run (pass --resume to reuse its tensors)", staging)
        unlink(marker)  # other ranks stop treating the old shards as current
        keep = {f"rank-{r}.failed" for r in range(1, world_size)}  # may be this run's early failures
        for item in staging.iterdir():
            if item.name not in keep:
                shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else unlink(item)
        _create_shards_exclusively(staging, plan.shards)
    token = uuid.uuid4().hex
    write_json_atomically(marker, {"plan": digest, "token": token, "world_size": world_size})
    return token


def _wait_for_ranks(staging: Path, ctx: DistContext, digest: str, token: str, timeout: float, silence: Silence) -> None:
    pending = set(range(1, ctx.world_size))
    deadline = time.monotonic() + timeout
    if pending:
        log.info("rank 0: waiting for rank(s) %s", ", ".join(map(str, sorted(pending))))
    while pending:
        for rank in sorted(pending):
            failed = read_json(staging / f"rank-{rank}.failed")
            if failed is not None and failed.get("token") in (None, token):  # another token: left by an older run
                raise MergeError(f"rank {rank} failed: {failed.get('error', 'unknown error')}; nothing was published")
            done = read_json(staging / f"rank-{rank}.done")
            if done and done.get("plan") == digest and done.get("token") == token:
                pending.discard(rank)
        if pending:
            dead = silence.dead(sorted(pending))
            if dead:
                raise MergeError(presumed_dead(dead, silence.timeout))
            if time.monotonic() > deadline:
                raise MergeError(
                    f"timed out after {timeout:g} s (--dist_timeout) waiting for rank(s) "
                    f"{', '.join(map(str, sorted(pending)))}; nothing was published"
                )
            time.sleep(POLL_SECONDS)


def _lead(cfg: MergeConfig, plan: Any, factory: Any, ctx: DistContext, output: Path, staging: Path, digest: str,
          heartbeats: Path, records: dict[str, object]) -> None:
    try:
        os.makedirs(staging, exist_ok=True)
        unlink(staging / "rank-0.failed")
        _test_kill_at("start")
        token = _prepare(staging, plan, digest, cfg.resume, ctx.world_size)
        run_share(cfg, plan, factory, ctx, staging, cfg.resume)
        _test_kill_at("waiting")
        silence = Silence(heartbeats, range(1, ctx.world_size), cfg.dist_heartbeat_timeout)
        _wait_for_ranks(staging, ctx, digest, token, cfg.dist_timeout, silence)
        for item in staging.iterdir():
            if item.name not in {shard.file for shard in plan.shards}:
                unlink(item)
        writer.finish_and_publish(
            staging, output, plan, overwrite=cfg.overwrite, prefix=cfg.merge_prefix, model_files_from=plan.models[0].path,
            records=records, tokenizer_files_from=plan.tokenizer_from,
        )
    except BaseException:
        remove_directory(staging)
        raise


# -- ranks 1 .. world_size-1 -----------------------------------------------------------------
def _follow(cfg: MergeConfig, plan: Any, factory: Any, ctx: DistContext, output: Path, staging: Path, digest: str,
            heartbeats: Path) -> None:
    os.makedirs(staging, exist_ok=True)
    staging_identity = identity(staging)
    unlink(staging / f"rank-{ctx.rank}.done")
    unlink(staging / f"rank-{ctx.rank}.failed")
    leader = Silence(heartbeats, [0], cfg.dist_heartbeat_timeout)
    done_token = working = None
    leader_dead = False  # then no failed marker: nobody would read it, and it would fail the next run's rank 0
    deadline = time.monotonic() + cfg.dist_timeout
    try:
        _test_kill_at("start")
        while True:
            if identity(staging) != staging_identity:
                if done_token is None:
                    raise MergeError(f"{staging} disappeared before rank 0 created the shards (rank 0 aborted?)")
                if identity(output) == staging_identity:
                    log.info("rank %d: rank 0 published %s", ctx.rank, output)
                    return
                raise MergeError("rank 0 aborted the merge; nothing was published")
            created = read_json(staging / SHARDS_CREATED)
            token = created.get("token") if created and created.get("plan") == digest else None
            if token is not None and token != done_token:
                working = token
                run_share(cfg, plan, factory, ctx, staging, cfg.resume)
                write_json_atomically(staging / f"rank-{ctx.rank}.done", {"plan": digest, "token": token})
                done_token = token
                _test_kill_at("waiting")
                deadline = time.monotonic() + cfg.dist_timeout
            if leader.dead([0]):
                leader_dead = True
                kept = f"; {staging} is kept for --resume" if (staging / SHARDS_CREATED).exists() else ""
                raise MergeError(presumed_dead([0], leader.timeout) + kept)
            if time.monotonic() > deadline:
                waiting = "rank 0 to create the shards" if done_token is None else "rank 0 to publish"
                raise MergeError(f"timed out after {cfg.dist_timeout:g} s (--dist_timeout) waiting for {waiting}")
            time.sleep(POLL_SECONDS)
    except BaseException as exc:
        if not leader_dead and identity(staging) == staging_identity:
            try:
                write_json_atomically(staging / f"rank-{ctx.rank}.failed", {"error": f"{exc}" or type(exc).__name__, "token": working})
            except OSError:
                pass
        raise


def merge_distributed(cfg: MergeConfig, plan: Any, factory: Any, ctx: DistContext, output: Path,
                      records: dict[str, object]) -> Path:
    """This rank's part of one merge; rank 0 publishes ``output`` after every rank is done."""
    writer.check_output_path(output, cfg.overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    digest = plan_hash(cfg, plan, ctx.world_size)
    staging = staging_path(output, digest)
    log.info("rank %d of %d (%s); staging %s", ctx.rank, ctx.world_size, ctx.source, staging)
    heartbeats = heartbeat_path(output, digest)
    started = time.perf_counter()
    with stop_signals_raise(), beating(heartbeats, ctx.rank, ctx.world_size, cfg.dist_heartbeat_timeout):
        if ctx.rank == 0:
            _lead(cfg, plan, factory, ctx, output, staging, digest, heartbeats, records)
            log.info("merged %d tensors (%.2f GB) from %d model(s) on %d rank(s) into %s in %.1f s", len(plan.tasks),
                     plan.total_size / 1e9, len(plan.models), ctx.world_size, output, time.perf_counter() - started)
        else:
            _follow(cfg, plan, factory, ctx, output, staging, digest, heartbeats)
    return output

