"""Per-stage wall times of a pipeline run, read from Snakemake's own log of that run.

Snakemake writes ``.snakemake/log/<timestamp>.snakemake.log`` per invocation, with a ``[date]`` line
before each job's start (``rule X:`` / ``localrule X:``) and its end (``Finished jobid: N (Rule: X)``).
This prints every job's duration (second resolution), grouped totals per stage kind, and the wall
time from the first start to the last finish.

    python bench/stage_times.py [LOG]        # default: the newest log under .snakemake/log/
"""

from __future__ import annotations

import argparse
import re
import sys
from datetime import datetime
from pathlib import Path

DATE = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$")
START = re.compile(r"^(?:local)?rule (\w+):$")
END = re.compile(r"^Finished jobid: \d+ \(Rule: (\w+)\)$")


def parse(text: str) -> dict[str, tuple[datetime, datetime | None]]:
    """rule -> (start, end) from one Snakemake log."""
    jobs: dict[str, tuple[datetime, datetime | None]] = {}
    stamp: datetime | None = None
    for line in text.splitlines():
        line = line.strip()
        if m := DATE.match(line):
            stamp = datetime.strptime(" ".join(m.group(1).split()), "%a %b %d %H:%M:%S %Y")
        elif (m := START.match(line)) and stamp is not None and m.group(1) != "all":
            jobs[m.group(1)] = (stamp, None)
        elif (m := END.match(line)) and stamp is not None and m.group(1) in jobs:
            jobs[m.group(1)] = (jobs[m.group(1)][0], stamp)
    return jobs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("log", nargs="?", help="a .snakemake/log/*.snakemake.log file (default: the newest)")
    args = ap.parse_args()
    if args.log:
        path = Path(args.log)
    else:
        logs = sorted(Path(".snakemake/log").glob("*.snakemake.log"))
        if not logs:
            sys.exit("no Snakemake log under .snakemake/log/ (run `make run` first)")
        path = logs[-1]
    jobs = parse(path.read_text())
    if not jobs:
        sys.exit(f"{path}: no jobs in this log (was everything up to date?)")
    print(f"{path}")
    print(f"{'stage':<40}{'start':>10}{'seconds':>9}")
    kinds: dict[str, float] = {}
    for name, (start, end) in sorted(jobs.items(), key=lambda kv: kv[1][0]):
        secs = (end - start).total_seconds() if end else float("nan")
        kind = name.split("_")[0] if name != "report" else "report"
        kinds[kind] = kinds.get(kind, 0.0) + (secs if end else 0.0)
        print(f"{name:<40}{start:%H:%M:%S}{secs:>9.0f}" + ("" if end else "  (not finished)"))
    first = min(s for s, _ in jobs.values())
    last = max((e for _, e in jobs.values() if e), default=first)
    print("per kind: " + ", ".join(f"{k} {v:.0f} s" for k, v in kinds.items()))
    print(f"DAG wall time: {(last - first).total_seconds():.0f} s ({(last - first).total_seconds() / 60:.1f} min), "
          f"{len(jobs)} jobs")


if __name__ == "__main__":
    main()
