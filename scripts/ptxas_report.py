#!/usr/bin/env python3
"""Per-kernel registers and spills from a `ptxas -v` log (scripts/kernel-check.sh).

    ptxas_report.py LOG MODULE

prints one line per kernel (`ok` or `SPILL`, registers, spill bytes) and exits 1 when any
kernel spills or the log names no kernel. ptxas -v writes, per entry function, "Compiling entry
function 'NAME' for 'sm_XX'", then "N bytes stack frame, S bytes spill stores, L bytes spill
loads" and "Used R registers".
"""
import re
import sys


def parse(text):
    """[(kernel, spill store bytes, spill load bytes, registers or None)] in log order."""
    name, rows = None, []
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            name = m.group(1)
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and name:
            rows.append([name, int(m.group(1)), int(m.group(2)), None])
        m = re.search(r"Used (\d+) registers", line)
        if m and rows and rows[-1][0] == name:
            rows[-1][3] = int(m.group(1))
    return [tuple(r) for r in rows]


def report(rows, module):
    """The report lines and whether the module passes (kernels found, none spills)."""
    lines = []
    for name, stores, loads, regs in rows:
        tag = "SPILL" if stores + loads > 0 else "ok   "
        lines.append(f"{tag} {module} {name}: {regs} registers, {stores} B spill stores, {loads} B spill loads")
    if not rows:
        lines.append(f"FAIL {module}: no kernel in the ptxas output")
    ok = bool(rows) and all(s + l == 0 for _, s, l, _ in rows)
    return lines, ok


def main(argv):
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    lines, ok = report(parse(open(argv[1]).read()), argv[2])
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
