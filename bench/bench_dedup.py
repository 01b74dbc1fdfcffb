"""dedup.py's throughput on this machine and the duplicate share it finds in the interpreter's own
site-packages (vendored copies under pip/_vendor and setuptools/_vendor, transformers' model files
copied from one another): documents/s and MB/s of the whole run (all seven stages, three reading
passes), with 1 and with 2 processes, and a check that both give byte-identical output.

    python bench/bench_dedup.py                        # all of site-packages' .py files
    python bench/bench_dedup.py --data SITE/transformers SITE/pip SITE/setuptools --workers 1 2

where SITE is `python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"`.
"""

import argparse
import hashlib
import os
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import script_parser  # noqa: E402
from dedup import dedup  # noqa: E402


def main():
    p = script_parser(__doc__)
    p.add_argument("--data", nargs="+", default=[sysconfig.get_paths()["purelib"]],
                   help="folders to deduplicate (default: this interpreter's site-packages)")
    p.add_argument("--ext", default="py", help="extensions read from the folders")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="process counts to time")
    p.add_argument("--shard-mb", type=float, default=16,
                   help="input MB per work unit (enough units to keep every process busy)")
    args = p.parse_args()
    ext = {"." + e.strip().lstrip(".") for e in args.ext.split(",")}
    from data import EXTENSIONS
    extensions = {e: lang for e, lang in EXTENSIONS.items() if e in ext}
    digests = {}
    print(f"load average before: {os.getloadavg()[0]:.1f} (the machine is shared)")
    print("| processes | documents in | MB in | seconds | documents/s | MB/s | CPU seconds | "
          "exact removed | near removed (clusters) | kept |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for workers in args.workers:
        with tempfile.TemporaryDirectory() as out:
            t0, cpu0 = time.perf_counter(), time.process_time()
            s = dedup(args.data, out, workers=workers, shard_mb=args.shard_mb,
                      extensions=extensions)
            seconds = time.perf_counter() - t0
            # with one process every task runs in this one: its CPU time is the whole cost
            cpu = f"{time.process_time() - cpu0:.1f}" if workers == 1 else "-"
            h = hashlib.sha256()
            for shard in sorted(Path(out).glob("*.jsonl")):
                h.update(shard.read_bytes())
            digests[workers] = h.hexdigest()
        n, mb = s["documents_in"], s["bytes_in"] / 1e6
        exact, near = s["exact_duplicates"], s["near_duplicates"]
        print(f"| {workers} | {n:,} | {mb:,.1f} | {seconds:.1f} | {n / seconds:,.0f} | "
              f"{mb / seconds:.2f} | {cpu} | {exact:,} ({100 * exact / n:.1f}%) | {near:,} "
              f"({100 * near / n:.1f}%, {s['near_clusters']:,}) | {s['documents_kept']:,} "
              f"({s['bytes_kept'] / 1e6:,.1f} MB, {100 * s['bytes_kept'] / s['bytes_in']:.1f}% "
              "of bytes) |", flush=True)
    same = len(set(digests.values())) == 1
    print(f"output identical across process counts: {same}")
    if not same:
        raise SystemExit("error: the output depends on the number of processes")


if __name__ == "__main__":
    main()
