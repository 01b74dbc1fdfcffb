"""Near-deduplication of a code corpus, the step before `data.py prepare`.

Code Llama trains on "publicly available, near-deduplicated" code (sec. 2.2) and says no more; this
follows BigCode's recipe for The Stack and StarCoder: exact duplicates removed by content hash, then
near duplicates found by MinHash over 5-grams of code tokens with locality-sensitive hashing (LSH),
one document kept per cluster. The engine is datatrove (Hugging Face's data library): its exact and
MinHash stages run as tasks, on this machine's cores (LocalPipelineExecutor) or as Slurm job arrays
on many machines (SlurmPipelineExecutor), the same stages either way.

It reads what `prepare` reads (directories of source files, .jsonl / .jsonl.gz, .parquet), through
data.py's own readers and filters, and writes what `prepare` reads: OUT/00000.jsonl, 00001.jsonl,
... (one per work unit, each line {"content", "lang", "source"}) and OUT/summary.json (documents in,
exact and near duplicates removed, clusters, bytes kept).

    pip install -r requirements-dedup.txt        # datatrove: only this step needs it
    python dedup.py --data /usr/lib/python3.11 --out /tmp/dedup     # every core of this machine
    python data.py prepare --data /tmp/dedup/*.jsonl --tokenizer tokenizer.model --out /tmp/shards

Many machines: the same stages as Slurm job arrays chained by dependencies; this command submits
them and returns (OUT on a disk every node sees; summary.json appears when the last one is done):

    python dedup.py --data /shared/crawl/*.jsonl.gz --out /shared/dedup --shard-mb 256 \
        --slurm-partition cpu --slurm-time 12:00:00 --slurm-options='--qos=high --account=ml'

Its tasks run this interpreter (--slurm-python another, the same path on every node), tried here
first, as are the sbatch options (sbatch --test-only): nothing is submitted when either fails. A
stage that fails cancels the ones after it. Re-running with the same inputs and settings resumes
where it stopped (datatrove skips finished tasks; refused while the chain submitted before is still
queued or running); once done it only prints the summary again: the output never changes. The
console shows one line per stage and the summary (and any error); datatrove's full logs, a file per
task, are in OUT/work/logs/STAGE/logs/, Slurm's own (each job's command, each stage's statistics) in
OUT/work/slurm/STAGE/. The signatures in OUT/work are deleted at the end.
"""
import argparse
import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from common import script_parser, write_atomic
from data import (EXTENSIONS, MAX_FILE_BYTES, MAX_LINE_CHARS, MAX_MEAN_LINE_CHARS,
                  add_reader_flags, list_units, read_unit, reader_settings)

try:
    import multiprocess  # datatrove's multiprocessing (pickles with dill)
    from datatrove.data import Document
    from datatrove.executor import LocalPipelineExecutor, SlurmPipelineExecutor
    from datatrove.pipeline.base import PipelineStep
    from datatrove.pipeline.dedup.exact_dedup import (ExactDedupConfig, ExactDedupFilter,
                                                      ExactDedupSignature, ExactFindDedups)
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets,
                                                  MinhashDedupCluster, MinhashDedupFilter,
                                                  MinhashDedupSignature)
    from datatrove.utils.hashing import HashConfig
    from datatrove.utils.logging import logger, setup_default_logger
    from datatrove.utils.word_tokenizers import WordTokenizer
except ImportError as e:  # the engine is an optional install: training never needs it
    MISSING = (f"dedup.py needs datatrove ({(e.name or '?').split('.')[0]} is missing): "
               "pip install -r requirements-dedup.txt")
    if __name__ == "__main__":
        raise SystemExit(f"error: {MISSING}") from None
    raise ImportError(MISSING) from None

FORMAT = "codellama-dedup-1"
ROOT = Path(__file__).resolve().parent  # on each Slurm task's PYTHONPATH: it imports data.py

# Jaccard similarity of 5-gram sets above which two files are near duplicates. The Stack v1
# (Kocetkov et al. 2022) removed pairs above 0.85; the SantaCoder report (Allal et al. 2023) found
# more aggressive near-deduplication gave better models, and StarCoder (Li et al. 2023) then used
# 5-grams at 0.7. We take 0.7: a fork with a changed comment or a few renamed variables is well
# above it, while two files that only share a licence header are far below it (tests/test_dedup.py).
THRESHOLD = 0.7
NGRAM = 5
NUM_PERM = 256  # MinHash permutations, as BigCode: the estimate's standard error is ~0.03
SEED = 1  # of the permutations: every task must draw the same ones
# sha1 (in the standard library) rather than datatrove's default xxhash, one package fewer; 64 bits
# keep collisions of shingles and of whole files (exact dedup) negligible.
HASH = HashConfig(precision=64, hash_fc="sha1")
# Code tokens: runs of letters, digits and underscores (identifiers, keywords, numbers), in any
# script. BigCode splits on non-alphanumerics the same way; unlike datatrove's default (English
# words of lower-cased text with numbers normalized) it keeps case and numbers, which are meaning in
# code, and ignores layout and punctuation, so re-indenting or reformatting changes nothing.
TOKEN = re.compile(r"\w+")
LINE = re.compile(r"[^\n]+")


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows): two documents become candidates when all `rows` MinHashes of one of `bands`
    bands agree, which happens with probability 1 - (1 - s^rows)^bands at Jaccard similarity s. The
    pair minimizes the area of false positives (s < threshold) plus false negatives (s >= threshold)
    under that S-curve, with bands * rows <= num_perm (the criterion datasketch uses too)."""
    s = np.linspace(0.0, 1.0, 1001)
    best = None
    for rows in range(1, num_perm + 1):
        for bands in range(1, num_perm // rows + 1):
            p = 1 - (1 - s ** rows) ** bands
            error = np.trapezoid(np.where(s < threshold, p, 0.0), s) + \
                np.trapezoid(np.where(s >= threshold, 1 - p, 0.0), s)
            if best is None or error < best[0]:
                best = (error, bands, rows)
    return best[1], best[2]


def shingles(text: str, n: int = NGRAM) -> set[str]:
    """The set of n-grams of code tokens of a text (a text under n tokens has none)."""
    tokens = TOKEN.findall(text)
    return {" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def jaccard(a: str, b: str, n: int = NGRAM) -> float:
    """The exact Jaccard similarity of two texts' shingle sets, which MinHash estimates."""
    x, y = shingles(a, n), shingles(b, n)
    return len(x & y) / max(1, len(x | y))


# --------------------------------------------------------------------------------------------------
# Pipeline steps of our own: reading with data.py, counting, writing what `prepare` reads. Task
# `rank` of a reading stage reads work unit `rank`, so every pass sees the same documents in the
# same order: datatrove's stages name documents by (task, position).


class ReadUnit(PipelineStep):
    """Yield the documents of work unit `rank` that data.py's filters keep (what `prepare` would
    tokenize); with `stats`, also count them and the skipped ones by reason."""
    name, type = "read with data.py", "codellama"

    def __init__(self, units, settings, stats=None):
        super().__init__()
        self.units, self.settings, self.stats_dir = units, settings, stats

    def run(self, data=None, rank=0, world_size=1):
        docs, n_bytes, skipped = 0, 0, {}
        for text, lang, reason, where in read_unit(self.units[rank], self.settings):
            if reason is not None:
                skipped[reason] = skipped.get(reason, 0) + 1
                continue
            size = len(text.encode("utf-8"))
            docs, n_bytes = docs + 1, n_bytes + size
            yield Document(text=text, id=where, metadata={"lang": lang, "bytes": size})
        if self.stats_dir:
            counts = {"documents": docs, "bytes": n_bytes, "skipped": skipped}
            write_atomic(Path(self.stats_dir) / f"{rank:05d}.json", json.dumps(counts))


class Count(PipelineStep):
    """Pass documents through, counting them, their bytes, and (with `cluster_key`) those that
    stand for a cluster of exact copies: datatrove's exact filter leaves their number of removed
    copies on the copy it keeps."""
    name, type = "count", "codellama"

    def __init__(self, stats, cluster_key=None):
        super().__init__()
        self.stats_dir, self.cluster_key = stats, cluster_key

    def run(self, data, rank=0, world_size=1):
        docs, n_bytes, clusters = 0, 0, 0
        for doc in data:
            docs, n_bytes = docs + 1, n_bytes + doc.metadata["bytes"]
            clusters += bool(self.cluster_key and doc.metadata[self.cluster_key] > 0)
            yield doc
        counts = {"documents": docs, "bytes": n_bytes, "clusters": clusters}
        write_atomic(Path(self.stats_dir) / f"{rank:05d}.json", json.dumps(counts))


class WriteJsonl(PipelineStep):
    """Write the kept documents of task `rank` as OUT/{rank:05d}.jsonl, atomically: the fields
    `prepare` reads (content, lang) and where each came from (source)."""
    name, type = "write jsonl", "codellama"

    def __init__(self, out):
        super().__init__()
        self.out = out

    def run(self, data, rank=0, world_size=1):
        def write(tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                for doc in data:
                    f.write(json.dumps({"content": doc.text, "lang": doc.metadata["lang"],
                                        "source": doc.id}, ensure_ascii=False) + "\n")
        write_atomic(Path(self.out) / f"{rank:05d}.jsonl", write)
        return iter(())


class Summarize(PipelineStep):
    """The last stage (one task): add up the per-task counts into OUT/summary.json, then delete the
    signatures and duplicate lists, which are big and no longer needed (logs and counts stay)."""
    name, type = "summarize", "codellama"

    def __init__(self, out, header):
        super().__init__()
        self.out, self.header = out, header

    def run(self, data=None, rank=0, world_size=1):
        work = Path(self.out) / "work"

        def total(stage):
            files = sorted((work / "counts" / stage).glob("*.json"))
            counts = [json.loads(f.read_text()) for f in files]
            return {k: sum(c[k] for c in counts) for k in counts[0] if k != "skipped"}, counts

        read, per_task = total("read")
        exact, _ = total("exact")
        kept, _ = total("kept")
        # near clusters: the distinct ids of the (document, cluster id) pairs of the cluster stage
        ids = [np.fromfile(f, np.uint32)[1::2]
               for f in sorted((work / "minhash_clusters").glob("*.clusters"))]
        near_clusters = len(np.unique(np.concatenate(ids))) if ids else 0
        skipped = {}
        for c in per_task:
            for reason, n in c["skipped"].items():
                skipped[reason] = skipped.get(reason, 0) + n
        summary = {**self.header, "complete": True,
                   "documents_in": read["documents"], "bytes_in": read["bytes"],
                   "skipped": dict(sorted(skipped.items())),
                   "exact_duplicates": read["documents"] - exact["documents"],
                   "exact_clusters": exact["clusters"],
                   "near_duplicates": exact["documents"] - kept["documents"],
                   "near_clusters": near_clusters,
                   "documents_kept": kept["documents"], "bytes_kept": kept["bytes"],
                   "shards": [f"{i:05d}.jsonl" for i in range(len(per_task))]}
        write_atomic(Path(self.out) / "summary.json", json.dumps(summary, indent=1) + "\n")
        for folder in ("exact_sigs", "exact_dups", "minhash_sigs", "minhash_buckets",
                       "minhash_clusters"):
            shutil.rmtree(work / folder, ignore_errors=True)
        return iter(())


def text_of(doc: Document) -> str:  # what exact dedup hashes (the annotation picks the hash)
    return doc.text


class CodeTokens(WordTokenizer):
    """Code tokens behind datatrove's word-tokenizer interface (which would otherwise load spaCy
    for English). MinHash only asks for words; lines stand for a file's sentences."""

    def word_tokenize(self, text: str) -> list[str]:
        return TOKEN.findall(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return [m.group() for m in LINE.finditer(text)]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for m in LINE.finditer(text)]


class CodeMinhashSignature(MinhashDedupSignature):
    """datatrove's MinHash signatures over our code shingles instead of its English words of
    normalized text (lower-cased, numbers replaced, punctuation removed)."""

    def __init__(self, output_folder, config):
        super().__init__(output_folder, config, language=CodeTokens())

    def get_shingles(self, text: str) -> np.ndarray:
        grams = shingles(text, self.config.n_grams)
        return np.fromiter((self._hash_func(g) for g in grams), np.uint64,
                           len(grams)).reshape(-1, 1)


# --------------------------------------------------------------------------------------------------
# The stages


def stages(units, settings, out, header, minhash):
    """(name, pipeline, tasks) of each stage, in order; each stage starts once the one before it
    is done. Reading stages run one task per work unit; the bucket stages one per LSH band; exact
    duplicates are found in as many hash ranges as there are units, at most one per band."""
    work, bands = f"{out}/work", minhash.num_buckets
    ranges = min(len(units), bands)
    exact = ExactDedupConfig(content_getter=text_of, hash_config=HASH)

    def read(stats=None):
        return ReadUnit(units, settings, stats)

    return [
        # 1. a 64-bit hash of every document's text, one sorted file per hash range
        ("exact_signatures", [read(), ExactDedupSignature(f"{work}/exact_sigs", exact,
                                                          finder_workers=ranges)], len(units)),
        # 2. per hash range: merge the sorted hashes of all tasks, list every copy but one
        ("exact_duplicates", [ExactFindDedups(f"{work}/exact_sigs", f"{work}/exact_dups", exact)],
         ranges),
        # 3. MinHash signatures of what exact dedup keeps, one sorted file per band and task
        ("minhash_signatures", [read(), ExactDedupFilter(f"{work}/exact_dups", exact),
                                CodeMinhashSignature(f"{work}/minhash_sigs", minhash)],
         len(units)),
        # 4. per band: documents whose band of signature is equal are candidate pairs
        ("minhash_buckets", [MinhashDedupBuckets(f"{work}/minhash_sigs", f"{work}/minhash_buckets",
                                                 config=minhash)], bands),
        # 5. union-find over all pairs: clusters, and every member but one to remove
        ("minhash_clusters", [MinhashDedupCluster(f"{work}/minhash_buckets",
                                                  f"{work}/minhash_clusters", config=minhash,
                                                  save_cluster_id=True)], 1),
        # 6. read again, drop both kinds of duplicates, write what `prepare` reads
        ("write", [read(f"{work}/counts/read"),
                   ExactDedupFilter(f"{work}/exact_dups", exact),
                   Count(f"{work}/counts/exact", "duplicate_count"),
                   MinhashDedupFilter(f"{work}/minhash_clusters"),
                   Count(f"{work}/counts/kept"),
                   WriteJsonl(out)], len(units)),
        # 7. add up the counts of every task: summary.json
        ("summary", [Summarize(out, header)], 1),
    ]


def quiet_console():
    """Let only datatrove's errors through to stderr (its full logs go to files): its warnings in
    this process are reminders of settings this script already makes (finder_workers)."""
    logger.remove()
    logger.add(sys.stderr, level="ERROR")


class QuietTasks:
    """datatrove logs each task to a file (logging_dir/logs/task_NNNNN.log, everything) and to
    stderr: every message for the task on local rank 0 (the first worker), errors only for the
    others, which is all that local_rank decides in its _run_for_rank (datatrove 0.10). Its stages
    also draw progress bars on stderr. At about 40 lines per task, a corpus of thousands of tasks
    would bury the progress lines and any error, so here every task gets the second treatment, and
    its stderr (those errors, the bars, any Python warning) goes to logs/task_NNNNN.stderr beside
    its log; a task that fails says so on the console, its exception follows. When a task ends,
    datatrove puts back its default console (every message, as the completion counts and each
    stage's statistics table); the process goes back to errors only instead."""

    def _run_for_rank(self, rank, local_rank=0, node_rank=-1):
        console = sys.stderr
        try:
            with self.logging_dir.open(f"logs/task_{rank:05d}.stderr", "w") as f, \
                    contextlib.redirect_stderr(f):
                return super()._run_for_rank(rank, local_rank + 1, node_rank)
        except Exception:
            log = self.logging_dir.resolve_paths(f"logs/task_{rank:05d}.log")
            print(f"dedup: task {rank} failed, its log: {log}", file=console)
            raise
        finally:
            quiet_console()


class LocalExecutor(QuietTasks, LocalPipelineExecutor):
    """datatrove's executor for this machine's cores, with a quiet console."""


class SlurmExecutor(QuietTasks, SlurmPipelineExecutor):
    """datatrove's Slurm executor, with a quiet console, whose launch scripts run datatrove's two
    tools (a stage's tasks, then the merge of their statistics) with the interpreter `python`
    rather than the `launch_pickled_pipeline` a node's PATH finds, if any."""

    def __init__(self, *args, python, **kwargs):
        super().__init__(*args, **kwargs)
        self.python = python

    def get_launch_file_contents(self, sbatch_args, run_script):
        tool = f"{shlex.quote(self.python)} -m datatrove.tools."
        run_script = re.sub(r"\b(launch_pickled_pipeline|merge_stats)\b",
                            lambda m: tool + m.group(1), run_script, count=1)
        return super().get_launch_file_contents(sbatch_args, run_script)


def sbatch_options(text: str) -> dict:
    """sbatch's long options in one string, as datatrove writes them into each launch script:
    "--qos=high --account ml --exclusive" -> {"qos": "high", "account": "ml", "exclusive": ""}."""
    options, pending = {}, None  # pending: an option without "=", which takes the next word
    for word in shlex.split(text or ""):
        if word.startswith("--"):
            name, eq, value = word[2:].partition("=")
            options[name], pending = value, (None if eq else name)
        elif pending:
            options[pending], pending = word, None
        else:
            raise ValueError(f"--slurm-options {text!r}: sbatch's long options only, as "
                             f"--name=value or --name value ({word!r} is neither)")
    return options


def queued_jobs(out: Path) -> list[str]:
    """The jobs of the chain last submitted for `out` that Slurm still holds (pending or
    running); none where there was no chain, or no Slurm on this machine."""
    jobs = out / "work" / "slurm" / "jobs.json"
    if not jobs.exists() or shutil.which("squeue") is None:
        return []
    ids = json.loads(jobs.read_text())
    run = subprocess.run(["squeue", "-h", "-o", "%A %j", "-j", ",".join(ids)],
                         capture_output=True, text=True)
    if run.returncode != 0:  # then two chains could write the same folder: better to stop
        raise ValueError(f"squeue cannot say whether jobs {' '.join(ids)} (of {jobs}) still run: "
                         + "; ".join(run.stderr.strip().splitlines()))
    held = {job for job, name in (line.split(" ", 1) for line in run.stdout.splitlines())
            if name.startswith("dedup_")}  # an id Slurm gave again, to another job, is not ours
    return sorted(held & set(ids), key=int)


def check_slurm(python: str, options: dict, tasks: int):
    """What can fail at submission, tried before anything is submitted: the interpreter the tasks
    will run imports this module (and so datatrove), and sbatch accepts the stages' options and
    their largest job array (sbatch --test-only)."""
    if shutil.which("sbatch") is None:
        raise ValueError("--slurm-partition: Slurm's sbatch is not on PATH")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    try:
        run = subprocess.run([python, "-c", "import dedup"], env=env, capture_output=True,
                             text=True)
    except OSError as e:
        raise ValueError(f"--slurm-python {python}: {e.strerror}") from None
    if run.returncode != 0:
        last = (run.stderr.strip().splitlines() or ["no message"])[-1]
        raise ValueError(f"--slurm-python {python} cannot import dedup.py: {last}")
    args = [f"--{k}={v}" if v else f"--{k}" for k, v in options.items()]
    run = subprocess.run(["sbatch", "--test-only", *args, f"--array=0-{min(tasks, 1001) - 1}",
                          "--wrap=true"], capture_output=True, text=True)
    if run.returncode != 0:
        raise ValueError(f"sbatch refuses the stages' options {' '.join(args)}: "
                         + "; ".join(run.stderr.strip().splitlines()))


def dedup(inputs, out, workers=None, threshold=THRESHOLD, ngram=NGRAM, num_perm=NUM_PERM,
          shard_mb=64, extensions=None, text_fields=("content", "text"),
          max_file_bytes=MAX_FILE_BYTES, max_line_chars=MAX_LINE_CHARS,
          max_mean_line_chars=MAX_MEAN_LINE_CHARS, slurm_partition=None, slurm_time="12:00:00",
          slurm_mem_gb=2, slurm_python=sys.executable, slurm_options=""):
    """Deduplicate `inputs` (what `prepare` reads) into `out`; returns summary.json's content, or
    None when the stages were submitted to Slurm (their tasks run `slurm_python`; `slurm_options`
    are more sbatch options, as "--qos=high --account=ml"). Resumes; a finished `out` is returned
    as is; `out` holding another run's output (other inputs or settings), or being deduplicated by
    a chain of Slurm jobs still queued or running, is an error."""
    if not 0 < threshold < 1:
        raise ValueError(f"threshold {threshold}: a Jaccard similarity strictly between 0 and 1")
    if ngram < 1 or num_perm < 1:
        raise ValueError(f"ngram {ngram} and num_perm {num_perm}: both must be at least 1")
    out = Path(out).resolve()
    settings = dict(shard_mb=shard_mb, extensions=extensions or EXTENSIONS,
                    text_fields=list(text_fields), max_file_bytes=max_file_bytes,
                    max_line_chars=max_line_chars, max_mean_line_chars=max_mean_line_chars)
    inputs = [str(Path(p).resolve()) for p in inputs]
    units = list_units(inputs, settings)
    bands, rows = lsh_bands(threshold, num_perm)
    header = {"format": FORMAT, "inputs": inputs, "settings": settings, "units": len(units),
              "plan": hashlib.sha256(json.dumps(units).encode()).hexdigest(),
              "threshold": threshold, "ngram": ngram, "num_perm": num_perm, "bands": bands,
              "rows": rows}
    plan = out / "work" / "plan.json"
    for path in (out / "summary.json", plan):
        if path.exists():
            old = json.loads(path.read_text())
            if any(old.get(k) != v for k, v in header.items()):
                raise ValueError(f"{out} holds the dedup of other inputs or settings: use another "
                                 "folder")
            if old.get("complete"):
                return old
    queued = queued_jobs(out)
    if queued:
        raise ValueError(f"{out} is being deduplicated by Slurm jobs {' '.join(queued)}, still "
                         f"queued or running: wait for them, or scancel them")
    if slurm_partition:
        # kill-on-invalid-dep: a stage that fails cancels the stages after it, rather than leave
        # them waiting for ever (DependencyNeverSatisfied); a re-run then resubmits what is left
        extra = {"kill-on-invalid-dep": "yes", **sbatch_options(slurm_options)}
        check_slurm(slurm_python, {"partition": slurm_partition, "time": slurm_time,
                                   "mem-per-cpu": f"{slurm_mem_gb}G", **extra},
                    max(len(units), bands))
    plan.parent.mkdir(parents=True, exist_ok=True)
    for stage in ("read", "exact", "kept"):
        (out / "work" / "counts" / stage).mkdir(parents=True, exist_ok=True)
    write_atomic(plan, json.dumps(header, indent=1))

    minhash = MinhashConfig(n_grams=ngram, num_buckets=bands, hashes_per_bucket=rows, seed=SEED,
                            hash_config=HASH)
    # datatrove's local workers come from a forkserver, which lives as long as this process: with
    # the engine imported there once, each stage's workers start as forks, not fresh interpreters
    multiprocess.set_forkserver_preload(["datatrove.executor", "datatrove.pipeline.dedup", "data"])
    submitted = []  # (stage, its Slurm executor): each depends on the one before
    quiet_console()  # one line per stage here; each task's full log is in OUT/work/logs/STAGE/
    try:
        for name, pipeline, tasks in stages(units, settings, str(out), header, minhash):
            logs = f"{out}/work/logs/{name}"
            if slurm_partition:
                depends = submitted[-1][1] if submitted else None
                submitted.append((name, SlurmExecutor(
                    pipeline, tasks=tasks, time=slurm_time, partition=slurm_partition,
                    depends=depends, mem_per_cpu_gb=slurm_mem_gb, qos=None, sbatch_args=extra,
                    job_name=f"dedup_{name}", logging_dir=logs,
                    slurm_logs_folder=f"{out}/work/slurm/{name}", python=slurm_python,
                    env_command=f"export PYTHONPATH={ROOT}:$PYTHONPATH")))
                continue
            # forkserver (datatrove's default): safe when the caller holds threads
            executor = LocalExecutor(pipeline, tasks=tasks, logging_dir=logs,
                                     workers=min(tasks, workers or os.cpu_count() or 1))
            todo, t0 = len(executor.get_incomplete_ranks()), time.time()
            executor.run()
            print(f"dedup: {name}: {todo}/{tasks} tasks run in {time.time() - t0:.1f}s",
                  file=sys.stderr)
        if slurm_partition:
            try:
                submitted[-1][1].run()  # launches the whole chain, first stage first
            except subprocess.CalledProcessError as e:  # sbatch's own message is above
                failed = next((name for name, x in submitted if x.job_id is None), "merge_stats")
                raise ValueError(f"sbatch failed (exit {e.returncode}) submitting stage "
                                 f"{failed}") from None
            finally:  # what a re-run waits for: the jobs submitted, all of them or up to a failure
                ids = [str(x.job_id) for _, x in submitted if x.job_id not in (None, -1)]
                write_atomic(out / "work" / "slurm" / "jobs.json", json.dumps(ids))
            for name, executor in submitted:
                job = "done before" if executor.job_id == -1 else f"job {executor.job_id}"
                print(f"dedup: {name}: {executor.tasks} tasks, Slurm {job}", file=sys.stderr)
            return None
    finally:
        setup_default_logger()  # datatrove's console again, as on import
    return json.loads((out / "summary.json").read_text())


def report(s: dict) -> str:
    pct = lambda n: f"{100 * n / max(1, s['documents_in']):.1f}%"  # noqa: E731
    skipped = ", ".join(f"{k} {v:,}" for k, v in s["skipped"].items()) or "none"
    return (f"{s['documents_in']:,} documents in ({s['bytes_in'] / 1e6:,.1f} MB; skipped by the "
            f"filters: {skipped}); exact duplicates removed {s['exact_duplicates']:,} "
            f"({pct(s['exact_duplicates'])}) in {s['exact_clusters']:,} clusters; near duplicates "
            f"removed {s['near_duplicates']:,} ({pct(s['near_duplicates'])}) in "
            f"{s['near_clusters']:,} clusters (Jaccard >= {s['threshold']}, {s['bands']} bands x "
            f"{s['rows']} rows); kept {s['documents_kept']:,} documents, "
            f"{s['bytes_kept'] / 1e6:,.1f} MB in {len(s['shards'])} shards")


def main(argv=None):
    p = script_parser(__doc__)
    p.add_argument("--data", nargs="+", required=True,
                   help="directories of source files, .jsonl(.gz) or .parquet files (as prepare)")
    p.add_argument("--out", required=True,
                   help="folder for the deduplicated NNNNN.jsonl shards and summary.json")
    p.add_argument("--workers", type=int, default=os.cpu_count(),
                   help="processes on this machine (without --slurm-partition)")
    p.add_argument("--threshold", type=float, default=THRESHOLD,
                   help="Jaccard similarity of 5-gram sets above which files are near duplicates")
    p.add_argument("--ngram", type=int, default=NGRAM, help="code tokens per shingle")
    p.add_argument("--num-perm", type=int, default=NUM_PERM, help="MinHash permutations")
    p.add_argument("--shard-mb", type=float, default=64,
                   help="input megabytes per work unit: one task and one output shard each")
    add_reader_flags(p)
    p.add_argument("--slurm-partition", default=None,
                   help="submit the stages as Slurm job arrays to this partition instead")
    p.add_argument("--slurm-time", default="12:00:00", help="time limit of each Slurm task")
    p.add_argument("--slurm-mem-gb", type=int, default=2,
                   help="memory of each Slurm task; the clustering task holds every duplicate pair")
    p.add_argument("--slurm-python", default=sys.executable,
                   help="the interpreter every Slurm task runs (the same path on every node), "
                        "tried here before anything is submitted")
    p.add_argument("--slurm-options", default="",
                   help="more sbatch options for every stage, as one string after an equals "
                        "sign: --slurm-options='--qos=high --account=ml'")
    args = p.parse_args(argv)
    t0 = time.time()
    try:
        summary = dedup(args.data, args.out, workers=args.workers, threshold=args.threshold,
                        ngram=args.ngram, num_perm=args.num_perm, shard_mb=args.shard_mb,
                        slurm_partition=args.slurm_partition, slurm_time=args.slurm_time,
                        slurm_mem_gb=args.slurm_mem_gb, slurm_python=args.slurm_python,
                        slurm_options=args.slurm_options, **reader_settings(p, args))
    except (FileNotFoundError, ValueError, ImportError) as e:
        raise SystemExit(f"error: {e}") from None
    if summary is None:
        print(f"submitted to Slurm, the tasks to run {args.slurm_python}; {args.out}/summary.json "
              "appears when the last stage is done")
    else:
        print(f"{args.out}: {report(summary)} ({time.time() - t0:.1f}s)")


if __name__ == "__main__":
    # Run as the module `dedup`, not as `__main__`: datatrove pickles the pipeline with dill, which
    # copies a class of `__main__` by value but not the globals its methods use, so a Slurm task (a
    # fresh launch_pickled_pipeline process) would miss them; it imports `dedup` instead.
    import dedup
    dedup.main()
