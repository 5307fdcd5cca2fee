#!/usr/bin/env python3
"""Runs the contract suite against every backend and writes docs/contract-table.md.

Each column is one `cargo test` run; a cell is what that run printed for the case (ok /
FAILED, or "-" when the run had no such test, e.g. the backend's crate is absent). The brokers
must be up (scripts/brokers.sh).
"""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (column, cargo test arguments, test threads). Kafka's restart case restarts the shared tansu,
# so its cases run one at a time.
RUNS = [
    ("memory", ["-p", "spindle-memory", "--test", "contract"], 8),
    ("rabbitmq", ["-p", "spindle-rabbitmq", "--test", "contract"], 8),
    ("kafka (tansu)", ["-p", "spindle-kafka", "--test", "contract"], 1),
    ("sqs queue (moto)", ["-p", "spindle-sqs", "--test", "contract_queue"], 8),
    ("sqs fan-out (moto)", ["-p", "spindle-sqs", "--test", "contract_fanout"], 8),
]


def cases():
    lib = open(os.path.join(ROOT, "crates/spindle-contract/src/lib.rs")).read()
    block = lib[lib.index("pub const CASES"):]
    block = block[: block.index("];")]
    return re.findall(r'"([a-z_]+)"', block)


def run(args, threads, cache):
    key = tuple(args)
    if key not in cache:
        proc = subprocess.run(
            ["cargo", "test", *args, "--", "--test-threads", str(threads)],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        if "could not find" in proc.stderr or "no test target" in proc.stderr:
            cache[key] = None
        else:
            cache[key] = dict(re.findall(r"^test (\S+) \.\.\. (ok|FAILED)", proc.stdout, re.M))
    return cache[key]


def main():
    names = cases()
    cache = {}
    columns = []
    for title, args, threads in RUNS:
        print(f"running {title} ...", file=sys.stderr)
        columns.append((title, run(args, threads, cache)))
    lines = [
        "# Contract results per backend",
        "",
        "Written by `scripts/contract-table.py` from a test run (brokers up). `ok` means the",
        "case passed: it exercised the behaviour, or, where the backend's capabilities say the",
        "feature is absent, asserted that the operation returns `Error::Unsupported`.",
        "",
        "| case | " + " | ".join(t for t, _ in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    totals = [0] * len(columns)
    for name in names:
        cells = []
        for i, (_, results) in enumerate(columns):
            if results is None:
                cells.append("-")
                continue
            outcome = results.get(name, "-")
            totals[i] += outcome == "ok"
            cells.append(outcome)
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    lines.append("| **passed** | " + " | ".join(f"**{n}/{len(names)}**" for n in totals) + " |")
    out = os.path.join(ROOT, "docs", "contract-table.md")
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
