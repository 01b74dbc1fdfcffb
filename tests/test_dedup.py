"""dedup.py on real files: standard-library modules, a vendored copy of a package, forks with a
changed comment or renamed variables, two distinct files under one licence header, and a JSONL
source. Exact and near duplicates are removed, distinct files kept, re-running changes nothing,
`prepare` reads the output, and bad input is a one-line error."""

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("datatrove", reason="dedup.py's engine: pip install -r requirements-dedup.txt")
import dedup  # noqa: E402
from data import prepare  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STDLIB = Path(os.__file__).parent
TOKENIZER = ROOT.parent / "shared/data/llama2/tokenizer.model"
UNIT_MB = 0.05  # small work units: the corpus spans several tasks, and so do its duplicate pairs


def rename(text, names):
    for old, new in names.items():
        text = re.sub(rf"\b{old}\b", new, text)
    return text


def licence_header():
    """The licence comment block of the standard library's ElementTree (36 lines)."""
    lines = (STDLIB / "xml/etree/ElementTree.py").read_text().splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if "Licensed to PSF" in line) - 1
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("#"))
    return "".join(lines[start:end])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A source folder and a JSONL file; returns them with the texts planted in them."""
    root = tmp_path_factory.mktemp("corpus")
    src = root / "src"
    shutil.copytree(STDLIB / "json", src / "lib/json", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(STDLIB / "json", src / "lib/_vendor/json",  # a vendored copy: exact duplicates
                    ignore=shutil.ignore_patterns("__pycache__"))
    t = {name: (STDLIB / name).read_text() for name in
         ("textwrap.py", "shlex.py", "colorsys.py", "keyword.py", "bisect.py", "fnmatch.py")}
    for name in ("textwrap.py", "shlex.py", "colorsys.py"):
        (src / "lib" / name).write_text(t[name])
    # A fork that rewrote ten comments, and one that renamed two variables: near duplicates.
    lines = t["textwrap.py"].splitlines(keepends=True)
    comments = [i for i, line in enumerate(lines) if line.lstrip().startswith("# ")][:10]
    comment_fork = "".join(line.split("#")[0] + "# reworded by the fork\n" if i in comments
                           else line for i, line in enumerate(lines))
    rename_fork = rename(t["shlex.py"], {"posix": "posix_mode", "quotes": "quote_chars"})
    # A rewrite that renamed its four main variables throughout: related, but below the threshold.
    rewrite = rename(t["colorsys.py"], {"r": "red", "g": "green", "b": "blue", "h": "hue"})
    (src / "forks").mkdir()
    (src / "forks/textwrap.py").write_text(comment_fork)
    (src / "forks/shlex.py").write_text(rename_fork)
    (src / "forks/colorsys.py").write_text(rewrite)
    # Two distinct small modules under the same 36-line licence header: both must stay.
    header = licence_header()
    (src / "licensed").mkdir()
    (src / "licensed/keyword.py").write_text(header + t["keyword.py"])
    (src / "licensed/bisect.py").write_text(header + t["bisect.py"])
    # A JSONL source: an exact copy of a file of the folder, a new file, and a broken line.
    jsonl = root / "extra.jsonl.gz"
    with gzip.open(jsonl, "wt") as f:
        f.write(json.dumps({"content": t["shlex.py"], "lang": "python"}) + "\n")
        f.write(json.dumps({"content": t["fnmatch.py"], "lang": "python"}) + "\n")
        f.write("{not json\n")
    return {"inputs": [src, jsonl], "t": t, "comment_fork": comment_fork,
            "rename_fork": rename_fork, "rewrite": rewrite, "header": header}


@pytest.fixture(scope="module")
def result(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("dedup")
    return out, dedup.dedup(corpus["inputs"], out, workers=1, shard_mb=UNIT_MB)


def records(out):
    rows = []
    for shard in sorted(Path(out).glob("*.jsonl")):
        rows += [json.loads(line) for line in shard.read_text().splitlines()]
    return rows


def test_planted_pairs_are_what_they_claim(corpus):
    """The planted forks are near duplicates by the measure MinHash estimates, the rewrite and the
    licensed pair are not: otherwise the tests below would test nothing."""
    t = corpus["t"]
    assert 0.9 < dedup.jaccard(t["textwrap.py"], corpus["comment_fork"]) < 1
    assert 0.8 < dedup.jaccard(t["shlex.py"], corpus["rename_fork"]) < 0.9
    assert 0.3 < dedup.jaccard(t["colorsys.py"], corpus["rewrite"]) < 0.6
    h = corpus["header"]
    assert 0.3 < dedup.jaccard(h + t["keyword.py"], h + t["bisect.py"]) < 0.5


def test_exact_and_near_duplicates_removed(corpus, result):
    out, s = result
    t, kept = corpus["t"], [r["content"] for r in records(out)]
    # the vendored json package (5 files) and the JSONL copy of shlex.py
    assert s["exact_duplicates"] == 6 and s["exact_clusters"] == 6
    assert s["near_duplicates"] == 2 and s["near_clusters"] == 2
    assert s["skipped"] == {"bad_json": 1}
    json_files = sorted((STDLIB / "json").glob("*.py"))
    assert s["documents_in"] == 2 * len(json_files) + 3 + 3 + 2 + 2
    assert s["documents_kept"] == s["documents_in"] - 8 == len(kept)
    assert s["bytes_kept"] == sum(len(k.encode()) for k in kept)
    for f in json_files:
        assert kept.count(f.read_text()) == 1, f
    assert kept.count(t["shlex.py"]) + kept.count(corpus["rename_fork"]) == 1
    assert kept.count(t["textwrap.py"]) + kept.count(corpus["comment_fork"]) == 1
    for text in (t["colorsys.py"], corpus["rewrite"], t["fnmatch.py"],
                 corpus["header"] + t["keyword.py"], corpus["header"] + t["bisect.py"]):
        assert kept.count(text) == 1
    assert len(set(kept)) == len(kept)
    langs = {r["lang"] for r in records(out)}
    assert langs == {"python"}
    assert not (out / "work" / "minhash_sigs").exists()  # the big intermediates are gone


def test_rerun_is_idempotent(corpus, result, tmp_path):
    out, s = result
    before = {p.name: p.read_bytes() for p in out.glob("*.jsonl")}
    assert dedup.dedup(corpus["inputs"], out, workers=1, shard_mb=UNIT_MB) == s  # resumes: done
    assert {p.name: p.read_bytes() for p in out.glob("*.jsonl")} == before
    again = dedup.dedup(corpus["inputs"], tmp_path / "again", workers=1, shard_mb=UNIT_MB)
    assert {p.name: p.read_bytes() for p in (tmp_path / "again").glob("*.jsonl")} == before
    assert again == s
    # deduplicating the output finds nothing more
    twice = dedup.dedup(sorted(out.glob("*.jsonl")), tmp_path / "twice", workers=1)
    assert twice["exact_duplicates"] == twice["near_duplicates"] == 0
    assert twice["documents_kept"] == s["documents_kept"]


@pytest.mark.skipif(not TOKENIZER.is_file(), reason=f"needs {TOKENIZER}")
def test_prepare_reads_the_output(result, tmp_path):
    out, s = result
    meta = prepare(sorted(out.glob("*.jsonl")), TOKENIZER, tmp_path / "shards", workers=1,
                   progress=False)
    assert meta["documents"] == s["documents_kept"] and meta["skipped"] == {}
    assert meta["languages"] == {"python": s["documents_kept"]}


def test_bad_input_is_a_clear_error(corpus, result, tmp_path):
    out, _ = result
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dedup.dedup([tmp_path / "missing"], tmp_path / "o1", workers=1)
    (tmp_path / "nocode").mkdir()
    (tmp_path / "nocode/readme.xyz").write_text("x")
    with pytest.raises(ValueError, match="no files with a known extension"):
        dedup.dedup([tmp_path / "nocode"], tmp_path / "o2", workers=1)
    with pytest.raises(ValueError, match="other inputs or settings"):
        dedup.dedup(corpus["inputs"], out, workers=1, shard_mb=UNIT_MB, threshold=0.85)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        dedup.dedup(corpus["inputs"], tmp_path / "o3", threshold=1.5)
    run = subprocess.run([sys.executable, str(ROOT / "dedup.py"), "--data", str(tmp_path / "no"),
                          "--out", str(tmp_path / "o4")], capture_output=True, text=True)
    assert run.returncode == 1 and run.stderr.strip().count("\n") == 0
    assert run.stderr.startswith("error: data source") and "does not exist" in run.stderr


def test_console_is_one_line_per_stage(tmp_path):
    """datatrove's logs (some 40 lines per task) and progress bars go to files, not the console."""
    run = subprocess.run([sys.executable, str(ROOT / "dedup.py"), "--data", str(STDLIB / "json"),
                          "--out", str(tmp_path / "o"), "--workers", "2", "--shard-mb", "0.02"],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stderr.splitlines()
    assert len(lines) == 7 and all(line.startswith("dedup: ") for line in lines), run.stderr[-2000:]
    assert run.stdout.count("\n") == 1 and "documents in" in run.stdout
    logs = sorted((tmp_path / "o/work/logs/minhash_buckets/logs").glob("task_*.log"))
    assert len(logs) == 25 and all("Processing done" in log.read_text() for log in logs)


def test_missing_engine_is_one_line():
    code = ("import runpy, sys; sys.modules['datatrove'] = None; sys.argv = ['dedup.py', '--help'];"
            f"runpy.run_path({str(ROOT / 'dedup.py')!r}, run_name='__main__')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 1
    assert run.stderr.strip() == ("error: dedup.py needs datatrove (datatrove is missing): "
                                  "pip install -r requirements-dedup.txt")


def test_lsh_bands_follow_the_threshold():
    for threshold in (0.7, 0.85):
        bands, rows = dedup.lsh_bands(threshold, 256)
        assert bands * rows <= 256

        def p(s):  # probability that a pair of Jaccard similarity s becomes a candidate
            return 1 - (1 - s ** rows) ** bands
        assert p(threshold + 0.1) > 0.9 and p(threshold - 0.2) < 0.05
        assert 0.3 < p(threshold) < 0.7
    assert dedup.lsh_bands(0.7, 256) == (25, 10)


def test_sbatch_options():
    assert dedup.sbatch_options("--qos=high --account ml --exclusive --comment 'a b'") == {
        "qos": "high", "account": "ml", "exclusive": "", "comment": "a b"}
    with pytest.raises(ValueError, match=r"sbatch's long options only, .* \('-A' is neither\)"):
        dedup.sbatch_options("-A ml")


FAKE_SBATCH = r"""#!/bin/bash
# Slurm's sbatch, as far as dedup.py needs it: record the job, run its array tasks one by one
# (dependencies hold, since datatrove submits each stage after the one it depends on), print the id.
[ "$1" = --test-only ] && exit 0  # dedup.py's check of the options before it submits
n=$(ls "$FAKE_SLURM" | grep -c '\.sh$')
script="${@: -1}"
cp "$script" "$FAKE_SLURM/job_$n.sh"
echo "$@" > "$FAKE_SLURM/job_$n.args"
if grep -q launch_pickled_pipeline "$script"; then
    last=$(sed -n 's/^#SBATCH --array=0-\([0-9]*\).*/\1/p' "$script")
    for i in $(seq 0 "$last"); do
        SLURM_ARRAY_TASK_ID=$i SLURM_NODELIST=localhost bash "$script" \
            >> "$FAKE_SLURM/tasks.log" 2>&1 || exit 1
    done
fi
echo "Submitted batch job $((n + 100))"
"""
FAKE_SRUN = """#!/bin/bash
shift 3  # -l -n 1
exec "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
echo localhost  # scontrol show hostnames localhost
"""


def test_slurm_stages_run_as_job_arrays(corpus, result, tmp_path, monkeypatch):
    """The Slurm path end to end, with sbatch, srun and scontrol played by small scripts: 7 stages
    submitted as job arrays chained by afterok, each task a fresh process that imports dedup.py and
    data.py, and the same output as on one machine. tests/test_slurm.py runs it on a real Slurm."""
    bin_dir, jobs = tmp_path / "bin", tmp_path / "jobs"
    bin_dir.mkdir(), jobs.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(jobs))
    src = corpus["inputs"][0] / "lib/json"  # one unit, and 4 permutations: one band, 7 tasks
    local = dedup.dedup([src], tmp_path / "local", workers=1, num_perm=4)
    out = tmp_path / "slurm"
    assert dedup.dedup([src], out, num_perm=4, slurm_partition="cpu") is None
    stages = [a for a in sorted(jobs.glob("job_*.args"), key=lambda p: int(p.stem[4:]))
              if "launch_pickled_pipeline" in a.with_suffix(".sh").read_text()]
    assert len(stages) == 7, (jobs / "tasks.log").read_text()[-3000:]
    assert "--dependency" not in stages[0].read_text()
    assert all("--dependency=afterok:" in a.read_text() for a in stages[1:])
    assert json.loads((out / "summary.json").read_text()) == local
    for shard in (tmp_path / "local").glob("*.jsonl"):
        assert (out / shard.name).read_bytes() == shard.read_bytes()
