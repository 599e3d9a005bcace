"""`harness leaderboard`: build the leaderboards (``harness.analysis.leaderboard``) and write them
(``harness.analysis.report``)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from harness.analysis import report
from harness.analysis.leaderboard import CORRECTIONS, FORMATS, RECORD_NAME, build, print_warnings
from harness.errors import ConfigError


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="harness leaderboard",
        description="Aggregate run records into leaderboards (Markdown, CSV, HTML) and plots.",
    )
    p.add_argument("--results", default="results", help="directory searched for */result.json (default: results)")
    p.add_argument("--out", default=None, help="output directory (default: <results>/leaderboards)")
    p.add_argument("--format", default=",".join(FORMATS), help="comma-separated subset of md,csv,html (default: all)")
    p.add_argument("--task", default=None, help="only this task (task name, or name@budget)")
    p.add_argument("--metric", default=None, help="primary metric (default: test_acc, or test_ppl/val_ppl for LMs)")
    p.add_argument("--baseline", default=None, help="technique label (or key) to compare against on every task")
    p.add_argument(
        "--correction",
        default="holm",
        choices=list(CORRECTIONS),
        help="multiple-comparison correction within each table: holm (Holm-Bonferroni, default) or bh "
        "(Benjamini-Hochberg)",
    )
    p.add_argument("--no-plots", action="store_true", help="skip the matplotlib plots (faster)")
    p.add_argument("--redraw", action="store_true", help="redraw every plot (default: keep plots of unchanged tasks)")
    p.add_argument("--quiet", action="store_true", help="do not print the tables")
    return p.parse_args(argv)


def check_out(out: Path, what: str) -> None:
    """Refuse an output directory that is a file or cannot be written, before any work: create it (and its
    parents) and a probe file in it."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{what} {str(out)!r} is a file, not a directory; pass --out DIR")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(
            f"{what} {str(out)!r} is not writable ({e.strerror or e}); pass --out DIR with a writable directory"
        ) from None


def cli(argv: list[str]) -> int:
    t0 = time.perf_counter()
    args = parse_args(argv)
    try:
        formats = [f.strip() for f in args.format.split(",") if f.strip()]
        bad = [f for f in formats if f not in FORMATS]
        if bad or not formats:
            raise ConfigError(f"--format {args.format!r}: unknown {', '.join(bad) or '(empty)'}; valid: md, csv, html")
        results = Path(args.results)
        if not results.is_dir():
            raise ConfigError(f"--results {str(results)!r} is not a directory")
        out = Path(args.out) if args.out else results / "leaderboards"
        check_out(out, "--out" if args.out else "the default output directory")
        lb = build(results, args.task, args.metric, args.baseline, skip=(str(out),), correction=args.correction)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_warnings(lb)
    for pr in lb.problems:
        print(f"warning: skipped {pr.path}: {pr.reason}", file=sys.stderr)
    if not lb.boards:
        print(f"no records under {results} (looked for */{RECORD_NAME})", file=sys.stderr)
        return 1
    command = "harness leaderboard " + " ".join(argv) if argv else "harness leaderboard"
    written = report.write_all(
        lb, out, formats, plots=not args.no_plots, command=command.strip(), cache=not args.redraw
    )
    if not args.quiet:
        report.print_tables(lb)
    dt = time.perf_counter() - t0
    print(
        f"{lb.n_records} records, {len(lb.boards)} tasks, {len(lb.problems)} skipped -> {out} "
        f"({len(written)} files, {dt:.1f} s)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
