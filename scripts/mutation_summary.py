"""Summarise a mutmut pass (scripts/mutation.sh): per module, killed / survived / no tests /
timeouts and the kill rate, then every mutant that was not killed, with its diff.

Kill rate = killed / (killed + survived + no tests): a mutant that no selected test reaches is a
gap like a survivor; timeouts (a mutant that made a test loop) are counted as killed, as mutmut's
own summary does. Equivalent mutants are named in docs/testing.md, not subtracted here.
"""
from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

MUTMUT = str(Path(sys.executable).with_name("mutmut"))


def module_of(name: str) -> str:
    return re.split(r"\.x[_ǁ]", name, maxsplit=1)[0]


def main() -> int:
    out = subprocess.run([MUTMUT, "results", "--all", "true"], capture_output=True, text=True, check=True).stdout
    status = {}
    for line in out.splitlines():
        name, sep, what = line.strip().rpartition(": ")
        if sep and "__mutmut_" in name:
            status[name] = what
    per = defaultdict(Counter)
    for name, what in status.items():
        per[module_of(name)]["killed" if what in ("killed", "timeout") else what] += 1
    print(f"{'module':32} {'mutants':>7} {'killed':>6} {'survived':>8} {'no tests':>8} {'other':>5} {'kill rate':>9}")
    total = Counter()
    for mod in sorted(per):
        c = per[mod]
        total.update(c)
        print(_row(mod, c))
    print(_row("all", total))
    left = sorted(n for n, w in status.items() if w not in ("killed", "timeout"))
    print(f"\n{len(left)} not killed:")
    for name in left:
        diff = subprocess.run([MUTMUT, "show", name], capture_output=True, text=True).stdout
        body = [ln for ln in diff.splitlines() if ln.startswith(("-", "+")) and not ln.startswith(("---", "+++"))]
        print(f"\n{name}: {status[name]}")
        print("\n".join("    " + ln for ln in body))
    return 0


def _row(mod: str, c: Counter) -> str:
    n = sum(c.values())
    other = n - c["killed"] - c["survived"] - c["no tests"]
    judged = c["killed"] + c["survived"] + c["no tests"]
    rate = f"{c['killed'] / judged:.1%}" if judged else "n/a"
    return f"{mod:32} {n:7d} {c['killed']:6d} {c['survived']:8d} {c['no tests']:8d} {other:5d} {rate:>9}"


if __name__ == "__main__":
    sys.exit(main())
