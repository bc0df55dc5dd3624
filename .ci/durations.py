"""CI's closing table: each suite's result and time, then the slowest tests of the whole run.

    python .ci/durations.py REPORTS_DIR [--slowest 15] [--limit-s 300]

Reads the JUnit XML files pytest wrote (one per `make` target, named after it; .ci/run passes --junitxml) and
the wall times .ci/run measured (`<target>.seconds`). A test's time is pytest's: setup + call + teardown, so a
module fixture (a shared Ray cluster, a reference run) counts in the first test that uses it. A test over
--limit-s is named in a warning line (not a failure: a loaded machine must not fail CI by the clock), so the next
slow test is seen the day it lands.
"""

from __future__ import annotations

import argparse
import xml.etree.ElementTree as ET
from pathlib import Path


def read_suite(path: Path):
    """(counts, [(seconds, test id)]) of one JUnit XML file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    tests = []
    for suite in suites:
        for case in suite.iter("testcase"):
            outcome = "passed"
            if case.find("failure") is not None or case.find("error") is not None:
                outcome = "failed"
            elif case.find("skipped") is not None:
                outcome = "skipped"
            counts[outcome] += 1
            name = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
            tests.append((float(case.get("time") or 0.0), name))
    return counts, tests


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", type=Path)
    parser.add_argument("--slowest", type=int, default=15)
    parser.add_argument("--limit-s", type=float, default=300.0)
    args = parser.parse_args(argv)
    every = []
    print(f"\n{'suite':<18}{'passed':>8}{'failed':>8}{'skipped':>9}{'wall s':>9}{'tests s':>9}")
    for xml in sorted(args.reports.glob("*.xml")):
        counts, tests = read_suite(xml)
        wall = xml.with_suffix(".seconds")
        seconds = wall.read_text().strip() if wall.is_file() else "?"
        print(f"{xml.stem:<18}{counts['passed']:>8}{counts['failed']:>8}{counts['skipped']:>9}{seconds:>9}"
              f"{sum(t for t, _ in tests):>9.0f}")
        every += [(t, xml.stem, name) for t, name in tests]
    every.sort(reverse=True)
    print(f"\nthe {args.slowest} slowest tests (setup + call + teardown):")
    for seconds, suite, name in every[:args.slowest]:
        print(f"{seconds:>8.1f} s  [{suite}] {name}")
    for seconds, _, name in every:
        if seconds > args.limit_s:
            print(f"CI: warning: {name} took {seconds:.0f} s, over the {args.limit_s:.0f} s a test may take")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
