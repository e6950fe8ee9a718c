"""Summarise a mutmut pass (scripts/mutation.sh): per module, killed / survived / no tests /
timeouts and the kill rate, then every mutant that was not killed, with its diff.

Kill rate = killed / (killed + survived + no tests): a mutant that no selected test reaches is a
gap like a survivor; timeouts (a mutant that made a test loop) are counted as killed, as mutmut's
own summary does; "unrun" mutants were not reached before the pass stopped. Equivalent mutants
are named in docs/testing.md, not subtracted here. Run from the repository root (mutmut reads its
[tool.mutmut] from ./pyproject.toml). Arguments: mutant-name globs, to count only those mutants (a
group that mutates part of a module).
"""
from __future__ import annotations

import fnmatch
import re
import sys
from collections import Counter, defaultdict


def module_of(name: str) -> str:
    return re.split(r"\.x[_ǁ]", name, maxsplit=1)[0]


def main() -> int:
    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    from mutmut.stats import status_by_exit_code
    from mutmut.utils.file_utils import walk_mutatable_files

    status, path_of = {}, {}
    for path in walk_mutatable_files():
        data = SourceFileMutationData(path=path)
        data.load()
        for name, code in data.exit_code_by_key.items():
            if sys.argv[1:] and not any(fnmatch.fnmatchcase(name, g) for g in sys.argv[1:]):
                continue
            status[name], path_of[name] = status_by_exit_code[code], path
    per = defaultdict(Counter)
    for name, what in status.items():
        per[module_of(name)]["killed" if what in ("killed", "timeout") else what] += 1
    print(f"{'module':32} {'mutants':>7} {'killed':>6} {'survived':>8} {'no tests':>8} {'unrun':>5} {'kill rate':>9}")
    total = Counter()
    for mod in sorted(per):
        total.update(per[mod])
        print(_row(mod, per[mod]))
    print(_row("all", total))
    left = sorted(n for n, w in status.items() if w not in ("killed", "timeout", "not checked"))
    print(f"\n{len(left)} checked and not killed:")
    for name in left:
        diff = get_diff_for_mutant(name, path=path_of[name])
        body = [ln for ln in diff.splitlines() if ln.startswith(("-", "+")) and not ln.startswith(("---", "+++"))]
        print(f"\n{name}: {status[name]}")
        print("\n".join("    " + ln for ln in body))
    return 0


def _row(mod: str, c: Counter) -> str:
    n = sum(c.values())
    other = c["not checked"]
    judged = c["killed"] + c["survived"] + c["no tests"]
    rate = f"{c['killed'] / judged:.1%}" if judged else "n/a"
    return f"{mod:32} {n:7d} {c['killed']:6d} {c['survived']:8d} {c['no tests']:8d} {other:5d} {rate:>9}"


if __name__ == "__main__":
    sys.exit(main())
