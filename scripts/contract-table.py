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


def outcomes(stdout):
    """Case -> ok / FAILED. A test's outcome may land on a later line when something it ran
    printed to the terminal in between."""
    results, pending = {}, None
    for line in stdout.splitlines():
        m = re.match(r"^test (\S+) \.\.\. ?(.*)$", line)
        if m:
            name, rest = m.groups()
            if rest.strip() in ("ok", "FAILED"):
                results[name] = rest.strip()
                pending = None
            else:
                pending = name
        elif pending and line.strip().endswith(("ok", "FAILED")):
            results[pending] = "ok" if line.strip().endswith("ok") else "FAILED"
            pending = None
    return results


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
            cache[key] = outcomes(proc.stdout)
    return cache[key]


def previous_table(path):
    """Column title -> {case: outcome} from an earlier docs/contract-table.md."""
    if not os.path.exists(path):
        return {}
    rows = [l for l in open(path).read().splitlines() if l.startswith("| ")]
    titles = [t.strip() for t in rows[0].strip("|").split("|")][1:]
    table = {t: {} for t in titles}
    for row in rows[1:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        name = cells[0].strip("`")
        for title, cell in zip(titles, cells[1:]):
            if cell in ("ok", "FAILED"):
                table[title][name] = cell
    return table


def main():
    """With arguments, runs only the columns whose title contains one of them and keeps the
    others from the existing table."""
    names = cases()
    cache = {}
    columns = []
    out = os.path.join(ROOT, "docs", "contract-table.md")
    keep = previous_table(out) if sys.argv[1:] else {}
    for title, args, threads in RUNS:
        if sys.argv[1:] and not any(a in title for a in sys.argv[1:]):
            columns.append((title, keep.get(title)))
            continue
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
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
