"""What a failed Snakemake run says on the console: each failed job's own one-line error.

A stage writes its one-line error (`error: ...`, cm/cli.py) to its job's log file, and Snakemake's
console only says "check log file(s)"; the Snakefile's onerror prints these lines instead, with the
command that rebuilds a corrupt upstream file the error names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

_FAILED_RULE = re.compile(r"^Error in rule (\w+):")
_JOB_LOG = re.compile(r"^\s+log: (.+) \(check log file\(s\) for error details\)$")


def job_errors(snakemake_logs: Iterable[str | Path]) -> list[str]:
    """'<rule>: error: ...' for every failed job of a run whose log ends in a stage's one-line error.
    snakemake_logs: the run's own log files (what Snakemake passes to `onerror`)."""
    lines, rule = [], None
    text = "\n".join(Path(log).read_text(errors="replace") for log in snakemake_logs if Path(log).is_file())
    for line in text.splitlines():
        if match := _FAILED_RULE.match(line):
            rule = match[1]
        elif rule and (match := _JOB_LOG.match(line)):
            for log in match[1].split(", "):
                error = last_error(Path(log))
                if error:
                    lines.append(f"{rule}: {error}{rebuild_hint(error)}")
            rule = None
    return list(dict.fromkeys(lines))


def last_error(log: Path) -> str | None:
    """The last `error: ...` line of a job's log, if it has one."""
    if not log.is_file():
        return None
    found = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("error: ")]
    return found[-1] if found else None


def rebuild_hint(error: str) -> str:
    """For an error that names a pipeline output first (`error: results/...: not a readable
    checkpoint`), how to make it again; else ''."""
    path = error.removeprefix("error: ").split(":", 1)[0]
    if path.startswith("results/") and Path(path).is_file():
        return f" (rebuild it and what depends on it: snakemake --cores all --forcerun {path})"
    return ""
