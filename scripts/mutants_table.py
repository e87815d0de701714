#!/usr/bin/env python3
"""Per-crate table of a cargo-mutants run (scripts/mutants.sh) for docs/mutation.md.

Usage: scripts/mutants_table.py mutants.out [more mutants.out dirs, e.g. one per shard]
Prints a markdown table (caught, missed, unviable, timeout, score = caught / (caught + missed +
timeout)) per crate directory (reference/, harness/, src/cli/) and the list of missed mutants.
"""
import json
import sys
from collections import Counter, defaultdict

KINDS = {"CaughtMutant": "caught", "MissedMutant": "missed", "Unviable": "unviable", "Timeout": "timeout"}


def crate_of(path):
    for prefix in ("reference/", "harness/", "checkpoint/", "src/cli/"):
        if path.startswith(prefix):
            return prefix
    return path.split("/")[0] + "/"


def main(dirs):
    counts = defaultdict(Counter)
    missed = []
    for d in dirs:
        with open(f"{d}/outcomes.json") as f:
            data = json.load(f)
        for o in data["outcomes"]:
            m = o["scenario"].get("Mutant") if isinstance(o["scenario"], dict) else None
            if m is None:
                continue  # the unmutated baseline
            kind = KINDS.get(o["summary"], o["summary"])
            counts[crate_of(m["file"])][kind] += 1
            if kind in ("missed", "timeout"):
                missed.append((kind, m["name"]))
    print("| crate | mutants | caught | missed | unviable | timeout | caught / viable |")
    print("|---|---|---|---|---|---|---|")
    total = Counter()
    for crate in sorted(counts):
        c = counts[crate]
        total.update(c)
        viable = c["caught"] + c["missed"] + c["timeout"]
        score = f"{100 * c['caught'] / viable:.1f} %" if viable else "-"
        print(f"| `{crate}` | {sum(c.values())} | {c['caught']} | {c['missed']} | {c['unviable']} | {c['timeout']} | {score} |")
    viable = total["caught"] + total["missed"] + total["timeout"]
    if viable:
        print(f"| all | {sum(total.values())} | {total['caught']} | {total['missed']} | {total['unviable']} | "
              f"{total['timeout']} | {100 * total['caught'] / viable:.1f} % |")
    print()
    for kind, name in sorted(missed, key=lambda x: x[1]):
        print(f"- {kind}: `{name}`")


if __name__ == "__main__":
    main(sys.argv[1:] or ["mutants.out"])
