"""Where a pipeline run's time goes: each job's wall time from a Snakemake log, summed per rule.

    python benchmarks/pipeline_profile.py .snakemake/log/<latest>.snakemake.log

Prints, per rule, the jobs, their summed and longest wall time and the share of the summed job
time, then the run's wall time and the average number of jobs running at once (summed job time /
wall time; at most the cores given). A job's time includes its Python start-up and imports, which
the log cannot separate: `python -X importtime -m cm --help` measures those.
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from datetime import datetime
from pathlib import Path

STAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$")
START = re.compile(r"^(?:local)?rule (\w+):$")
JOBID = re.compile(r"^\s+jobid: (\d+)$")
FINISHED = re.compile(r"^Finished jobid: (\d+) \(Rule: (\w+)\)$")


def job_times(lines: list[str]) -> tuple[dict[str, list[float]], float]:
    """{rule: [wall seconds of each job]} and the seconds from the first job's start to the last's end."""
    now, rule, started, times, stamps = None, None, {}, defaultdict(list), []
    for line in lines:
        if match := STAMP.match(line):
            now = datetime.strptime(match[1], "%a %b %d %H:%M:%S %Y")
            stamps.append(now)
        elif match := START.match(line):
            rule = match[1]
        elif (match := JOBID.match(line)) and rule is not None:
            started[match[1]] = (rule, now)
            rule = None
        elif match := FINISHED.match(line):
            job_rule, began = started.pop(match[1])
            times[job_rule].append((now - began).total_seconds())
    return dict(times), (stamps[-1] - stamps[0]).total_seconds() if stamps else 0.0


def main(log: str) -> None:
    times, wall = job_times(Path(log).read_text().splitlines())
    total = sum(sum(t) for t in times.values())
    if not times:
        raise SystemExit(f"{log}: no finished job in this log (a dry run, a report, or nothing to do)")
    print(f"{'rule':<20} {'jobs':>4} {'sum s':>7} {'max s':>6} {'share':>6}")
    for rule, seconds in sorted(times.items(), key=lambda item: -sum(item[1])):
        print(f"{rule:<20} {len(seconds):>4} {sum(seconds):>7.0f} {max(seconds):>6.0f} {sum(seconds) / total:>6.1%}")
    print(f"wall {wall:.0f} s; summed job time {total:.0f} s; {total / wall:.2f} jobs running on average")


if __name__ == "__main__":
    main(sys.argv[1])
