"""Plan -> tokenize shards (worker processes, SLURM array tasks) -> merge, resumably.

Work files live in ``<output_prefix>.work/``:

* ``plan.json``: the settings, the tokenizer identity, the input fingerprints and the
  shard list. Every run and every array task computes the same plan; a resumed run
  refuses to continue with different settings or changed inputs.
* ``shard_NNNNNN.{bin,idx,hashes,json}``: one tokenized shard; the ``.json`` is written
  last, so a shard with a ``.json`` is finished and is never tokenized again.

The merge writes ``<prefix>.bin``, ``<prefix>.idx`` and finally the ``<prefix>.json``
sidecar (its presence marks a complete dataset), then removes the work directory.

Outputs already at the prefix are only replaced by the run that planned them (its plan is
in the work directory) or with ``overwrite``. Every run starts by deleting the temporary
files that killed runs on this host left behind (indexed_writer.remove_stale_temps).
"""

from __future__ import annotations

import ctypes
import json
import logging
import multiprocessing
import os
import shutil
import signal
import time
from pathlib import Path

from megalong.data.preprocess.config import PreprocessConfig
from megalong.data.preprocess.indexed_writer import bin_path, idx_path, remove_stale_temps, sidecar_path
from megalong.data.preprocess.merge import merge_shards
from megalong.data.preprocess.progress import ProgressLine
from megalong.data.preprocess.repo_rows import GROUP, PARTITION
from megalong.data.preprocess.sources import Shard, plan_shards
from megalong.data.preprocess.worker import shard_is_done, tokenize_shard, write_json_atomic

log = logging.getLogger("megalong.preprocess")

PLAN_VERSION = 1
STAGES = ("all", "tokenize", "merge")


class PlanMismatchError(RuntimeError):
    """The work directory was made by a run with other settings or other inputs."""


class IncompleteError(RuntimeError):
    """Merge asked for while shards are still missing."""


def array_task_from_env(environ=os.environ) -> tuple[int, int]:
    """(task index from 0, number of tasks) of a SLURM job array; (0, 1) outside one.
    SLURM numbers tasks as given to --array (e.g. 1-8), so the index is relative to the minimum."""
    if "SLURM_ARRAY_TASK_ID" not in environ:
        return 0, 1
    task_id = int(environ["SLURM_ARRAY_TASK_ID"])
    first = int(environ.get("SLURM_ARRAY_TASK_MIN", 0))
    count = int(environ.get("SLURM_ARRAY_TASK_COUNT", 1))
    return task_id - first, count


def _input_fingerprint(shards: list[Shard]) -> dict:
    """Size and modification time of every input file that shards address by offset or row,
    and of what was found unreadable (if it is fixed, the plan is out of date)."""
    kinds = ("jsonl-range", "jsonl-stream", "parquet", "unreadable", "repo-rows-partition")
    files = sorted({item[0] for s in shards if s.kind in kinds or s.kind.startswith("mds-") for item in s.items})
    return {name: _file_state(name) for name in files}


def _file_state(name: str) -> list[int] | None:
    try:
        stat = os.stat(name)
    except OSError:
        return None  # unreadable: reported by the reader
    return [stat.st_size, stat.st_mtime_ns]


def load_or_create_plan(cfg: PreprocessConfig, tokenizer) -> dict:
    work_dir = Path(cfg.work_dir)
    plan_path = work_dir / "plan.json"
    settings = cfg.plan_settings()
    identity = tokenizer.identity()
    if plan_path.is_file():
        plan = json.loads(plan_path.read_text(encoding="utf-8"))
        differing = sorted(k for k in set(settings) | set(plan["settings"]) if settings.get(k) != plan["settings"].get(k))
        if plan["tokenizer"]["sha256"] != identity["sha256"]:
            differing.append("tokenizer file (sha256)")
        if differing:
            raise PlanMismatchError(
                f"{work_dir} holds a run with different settings ({', '.join(differing)}); "
                f"rerun with the same settings to resume it, or delete {work_dir} to start over")
        shards = [Shard.from_dict(s) for s in plan["shards"]]
        changed = [name for name, old in plan["inputs"].items() if _file_state(name) != old]
        if changed:
            raise PlanMismatchError(
                f"input files changed since {work_dir} was planned (e.g. {changed[0]}); "
                f"delete {work_dir} to start over with the new inputs")
        return plan
    _refuse_foreign_outputs(cfg)
    shards = plan_shards(cfg)
    plan = {"version": PLAN_VERSION, "settings": settings, "tokenizer": identity,
            "inputs": _input_fingerprint(shards), "shards": [s.to_dict() for s in shards]}
    work_dir.mkdir(parents=True, exist_ok=True)
    # Array tasks may race here; they compute identical plans and the rename is atomic.
    write_json_atomic(plan_path, plan)
    return plan


def _refuse_foreign_outputs(cfg: PreprocessConfig) -> None:
    """Before a new plan: outputs at the prefix were not made by this run (a run that made
    them would have left its plan), so they are refused unless ``overwrite``. A work directory
    without a plan cannot be checked against this run, nor be deleted after the merge as if
    it were ours: refused always."""
    work_dir = Path(cfg.work_dir)
    if work_dir.is_dir():
        # plan.json(.tmp.*): a concurrent array task writing the same plan just now.
        foreign = sorted(p.name for p in work_dir.iterdir() if not p.name.startswith("plan.json"))
        if foreign:
            raise FileExistsError(
                f"{work_dir} exists without a plan.json (it holds {', '.join(foreign[:3])}"
                f"{' ...' if len(foreign) > 3 else ''}), so it is not the work of a run that can be resumed; "
                "remove it, or choose another --output-prefix")
    sidecar_file = sidecar_path(cfg.output_prefix)
    existing = [str(p) for p in (bin_path(cfg.output_prefix), idx_path(cfg.output_prefix), sidecar_file)
                if os.path.lexists(p)]
    if not existing:
        return
    what = "files not made by megalong preprocess"
    try:
        theirs, ours = json.loads(sidecar_file.read_text(encoding="utf-8"))["settings"], cfg.plan_settings()
        differing = sorted(k for k in theirs.keys() | ours.keys() if theirs.get(k) != ours.get(k))
        what = f"a dataset made with other settings ({', '.join(differing)})" if differing else "a dataset"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    if not cfg.overwrite:
        raise FileExistsError(
            f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''} ({what}), and no "
            f"plan in {work_dir} shows that this run made them; pass --overwrite to replace them, or "
            "choose another --output-prefix")
    log.warning("--overwrite: %s (%s) will be replaced when this run merges", ", ".join(existing), what)


def remove_leftover_temps(cfg: PreprocessConfig) -> None:
    """Delete the temporary files killed runs on this host left at the prefix and in the work
    directory; say which ones of other processes are left alone."""
    prefix = Path(cfg.output_prefix)
    outputs = {f"{prefix.name}{ext}" for ext in (".bin", ".idx", ".lengths", ".counts", ".modes", ".json")}
    removed, kept = remove_stale_temps(prefix.parent, outputs.__contains__)
    work_removed, work_kept = remove_stale_temps(cfg.work_dir, lambda name: True)  # all of it is ours
    removed, kept = removed + work_removed, kept + work_kept
    if removed:
        log.info("removed %d temporary file%s (%.1f MB) left by killed runs on this host: %s%s",
                 len(removed), "s" if len(removed) > 1 else "", sum(size for _, size in removed) / 1e6,
                 ", ".join(str(path) for path, _ in removed[:5]), " ..." if len(removed) > 5 else "")
    if kept:
        log.info("left alone %d temporary file%s of processes that are running or on other hosts "
                 "(remove them once no run on %s is active): %s%s", len(kept), "s" if len(kept) > 1 else "",
                 cfg.output_prefix, ", ".join(map(str, kept[:5])), " ..." if len(kept) > 5 else "")


def config_from_plan(output_prefix: str, **overrides) -> PreprocessConfig:
    """The settings of the run planned in ``<output_prefix>.work/`` (so ``--stage merge``
    needs only the output prefix)."""
    plan_path = Path(f"{output_prefix}.work") / "plan.json"
    if not plan_path.is_file():
        raise IncompleteError(f"{plan_path} does not exist: nothing was tokenized for {output_prefix} yet "
                              "(or it was already merged)")
    settings = json.loads(plan_path.read_text(encoding="utf-8"))["settings"]
    return PreprocessConfig(output_prefix=output_prefix, **settings, **overrides)


# --- worker processes -------------------------------------------------------------------
# Each pool process holds its own copy of these, set once by _init_worker (process-local
# state of a worker, not shared configuration).
_WORKER: dict = {}


def _die_with_parent() -> None:
    """Ask Linux to kill this worker when the parent dies, so a killed run leaves no orphan
    still writing shards (tmp names carry the pid, so an orphan could not corrupt one anyway)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _init_worker(cfg, tokenizer, work_dir, counters) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    # One thread per worker: Hugging Face tokenizers would otherwise start a thread per core
    # in every worker process.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    _WORKER.update(cfg=cfg, tokenizer=tokenizer, work_dir=work_dir, counters=counters)


def _add_to_counters(input_bytes: int, documents: int, tokens: int) -> None:
    counters = _WORKER["counters"]
    with counters.get_lock():
        counters[0] += input_bytes
        counters[1] += documents
        counters[2] += tokens


def _run_shard(shard_id: int, shard_dict: dict) -> dict:
    return tokenize_shard(shard_id, Shard.from_dict(shard_dict), _WORKER["cfg"], _WORKER["tokenizer"],
                          _WORKER["work_dir"], progress=_add_to_counters)


def tokenize_shards(cfg: PreprocessConfig, plan: dict, tokenizer, task_index: int = 0, num_tasks: int = 1,
                    progress_stream=None) -> dict:
    """Tokenize the shards of array task ``task_index`` of ``num_tasks`` (shard i goes to task
    i mod num_tasks) that are not finished yet. Returns counts for this call."""
    if not 0 <= task_index < num_tasks:
        raise ValueError(f"task index {task_index} is outside 0..{num_tasks - 1}")
    shards = plan["shards"]
    mine = [i for i in range(len(shards)) if i % num_tasks == task_index]
    pending = [i for i in mine if not shard_is_done(cfg.work_dir, i)]
    workers = min(cfg.num_workers, max(1, len(pending)))
    task_text = f"array task {task_index + 1} of {num_tasks}: " if num_tasks > 1 else ""
    log.info("%s%d shards in this task, %d already finished, %d to tokenize with %d worker process%s",
             task_text, len(mine), len(mine) - len(pending), len(pending), workers, "es" if workers > 1 else "")
    progress = ProgressLine(len(mine), sum(shards[i]["input_bytes"] for i in pending), stream=progress_stream)
    progress.shards = len(mine) - len(pending)
    totals = {"shards": 0, "documents": 0, "tokens": 0}

    def finished(stats: dict) -> None:
        totals["shards"] += 1
        totals["documents"] += stats["documents"]
        totals["tokens"] += stats["tokens"]

    def run_shards(pending: list[int]) -> None:
        if not pending:
            return
        if workers == 1:
            for shard_id in pending:
                stats = tokenize_shard(shard_id, Shard.from_dict(shards[shard_id]), cfg, tokenizer, cfg.work_dir,
                                       progress=progress.update)
                progress.update(shards=1)
                finished(stats)
        else:
            context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
            counters = context.Array("q", 3)
            seen = [0, 0, 0]
            pool = context.Pool(workers, initializer=_init_worker, initargs=(cfg, tokenizer, cfg.work_dir, counters))
            try:
                results = [(i, pool.apply_async(_run_shard, (i, shards[i]))) for i in pending]
                while results:
                    time.sleep(0.2)
                    still = []
                    for shard_id, result in results:
                        if result.ready():
                            finished(result.get())  # re-raises a worker's error here
                            progress.update(shards=1)
                        else:
                            still.append((shard_id, result))
                    results = still
                    # Read after the results: a finished shard has counted all of its work by then,
                    # so the last line shows everything.
                    with counters.get_lock():
                        now = list(counters)
                    progress.update(now[0] - seen[0], now[1] - seen[1], now[2] - seen[2])
                    seen = now
                pool.close()
            except BaseException:
                pool.terminate()
                raise
            finally:
                pool.join()

    # Grouping code repositories from rows needs every partition shard, of every array task.
    grouping = [i for i in pending if shards[i]["kind"] == GROUP]
    run_shards([i for i in pending if shards[i]["kind"] != GROUP])
    if grouping:
        _wait_for_partitions(cfg, shards)
        run_shards(grouping)
    progress.close()
    return totals


def _wait_for_partitions(cfg: PreprocessConfig, shards: list[dict], poll_s: float = 5.0) -> None:
    """Wait until every repository-rows partition shard is done (other array tasks make theirs)."""
    partitions = [i for i, shard in enumerate(shards) if shard["kind"] == PARTITION]
    last_log = 0.0
    while True:
        missing = [i for i in partitions if not shard_is_done(cfg.work_dir, i)]
        if not missing:
            return
        if time.monotonic() - last_log > 60:
            log.info("waiting for %d of %d partition shards (other array tasks; shard ids %s%s) before grouping "
                     "repositories", len(missing), len(partitions), ", ".join(map(str, missing[:5])),
                     " ..." if len(missing) > 5 else "")
            last_log = time.monotonic()
        time.sleep(poll_s)


def merge(cfg: PreprocessConfig, plan: dict) -> dict:
    work_dir = Path(cfg.work_dir)
    num_shards = len(plan["shards"])
    missing = [i for i in range(num_shards) if not shard_is_done(work_dir, i)]
    if missing:
        raise IncompleteError(
            f"{len(missing)} of {num_shards} shards in {work_dir} are not finished yet "
            f"(shard ids {', '.join(map(str, missing[:10]))}{' ...' if len(missing) > 10 else ''}); "
            "run the tokenize stage for them first (each array task i of N owns the shards with id mod N == i)")
    sidecar_file = sidecar_path(cfg.output_prefix)
    sidecar_file.unlink(missing_ok=True)  # a sidecar must only ever sit next to the outputs it describes
    log.info("merging %d shards into %s.bin/.idx%s", num_shards, cfg.output_prefix,
             " (dropping exact duplicates)" if cfg.dedup else "")
    kinds = {shard["kind"] for shard in plan["shards"]}
    packed = bool(kinds & {"mds-packed", "mds-packed-mask"})
    masked = "mds-packed-mask" in kinds
    counts = merge_shards(work_dir, num_shards, cfg.output_prefix, cfg.dedup, grouped=packed, multimodal=masked)
    from megalong import __version__

    settings = plan["settings"]
    sidecar = {
        "format": "megatron-core indexed dataset (.bin/.idx), one sequence per document",
        "token_dtype": "int32",
        "tokenizer": plan["tokenizer"],
        "bos_eos": {
            "add_bos": settings["add_bos"], "add_eos": settings["add_eos"],
            "bos_id": plan["tokenizer"]["bos_id"] if settings["add_bos"] else None,
            "eos_id": plan["tokenizer"]["eos_id"] if settings["add_eos"] else None,
            "meaning": "every document is stored as " + " + ".join(
                (["BOS"] if settings["add_bos"] else []) + ["text tokens"] + (["EOS"] if settings["add_eos"] else [])),
        },
        "filters": {"min_tokens": settings["min_tokens"], "max_tokens": settings["max_tokens"],
                    "dedup": settings["dedup"], "length_counts_bos_eos": True},
        **counts,
        "settings": settings,
        "shards": num_shards,
        "created_by": f"megalong {__version__} preprocess",
    }
    if packed:
        sidecar.update(packed_sidecar(masked))
    write_json_atomic(sidecar_file, sidecar)
    if not cfg.keep_work:
        shutil.rmtree(work_dir, ignore_errors=True)
    return sidecar


def packed_sidecar(masked: bool) -> dict:
    """What a dataset of packed MDS samples says about itself (megalong.data.packed reads it)."""
    from megalong.data.packed import SIDECAR_KIND

    return {
        "kind": SIDECAR_KIND,
        "format": "megatron-core indexed dataset (.bin/.idx): one document per packed sample (tokens exactly as "
                  "released), " + ("multimodal: one sequence per run of equal target flag inside a span, mode "
                               "bit 0 = target (mask != 0), bit 1 = the run opens a span" if masked
                               else "one sequence per span (a document inside the sample)"),
        "loss_mask": masked,
        "bos_eos": {"add_bos": False, "add_eos": False, "meaning": "packed samples are stored as released: nothing added"},
        "filters": {"min_tokens": 0, "max_tokens": 0, "dedup": False},
    }


def already_complete(cfg: PreprocessConfig) -> bool:
    """True when the outputs exist with this run's settings and no work is pending (a rerun
    after success, e.g. a requeued SLURM job, then does nothing)."""
    sidecar_file = sidecar_path(cfg.output_prefix)
    if Path(cfg.work_dir).exists() or not sidecar_file.is_file():
        return False
    try:
        sidecar = json.loads(sidecar_file.read_text(encoding="utf-8"))
    except ValueError:
        return False
    return sidecar.get("settings") == cfg.plan_settings() and all(
        Path(f"{cfg.output_prefix}{ext}").is_file() for ext in (".bin", ".idx"))


def run(cfg: PreprocessConfig, tokenizer, stage: str = "all", task_index: int = 0, num_tasks: int = 1,
        progress_stream=None) -> dict | None:
    """Run ``stage``; returns the sidecar after a merge, None after a tokenize-only stage."""
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r} is not one of {', '.join(STAGES)}")
    if not cfg.output_prefix:
        raise ValueError("an output prefix is needed")
    if (cfg.add_bos and tokenizer.bos_id is None) or (cfg.add_eos and tokenizer.eos_id is None):
        raise ValueError(f"the tokenizer {tokenizer.path} has no {'BOS' if cfg.add_bos and tokenizer.bos_id is None else 'EOS'} "
                         "token; turn that part of the BOS/EOS policy off (--no-bos / --no-eos)")
    remove_leftover_temps(cfg)
    if already_complete(cfg):
        log.info("%s.bin/.idx/.json already exist with these settings: nothing to do", cfg.output_prefix)
        return json.loads(sidecar_path(cfg.output_prefix).read_text(encoding="utf-8"))
    plan = load_or_create_plan(cfg, tokenizer)
    if stage in ("all", "tokenize"):
        tokenize_shards(cfg, plan, tokenizer, task_index, num_tasks, progress_stream)
    if stage == "merge" or (stage == "all" and num_tasks == 1):
        return merge(cfg, plan)
    if num_tasks > 1:
        log.info("this array task is done; when all %d tasks are, run the merge stage (--stage merge)", num_tasks)
    return None
