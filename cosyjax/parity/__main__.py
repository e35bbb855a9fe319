"""`python -m cosyjax.parity FIXTURE_ROOT [--only hift,flow] [--versions cosyvoice3]`.

Runs every fixture the checkers know, prints a table and exits non-zero on any failure.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback

from cosyjax.parity.core import FixtureContext, Result

CHECKERS = ("hift", "flow", "llm", "frontend", "e2e")
VERSIONS = ("cosyvoice2", "cosyvoice3")


def run(root: str, only=None, versions=None, verbose=False) -> list[Result]:
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    results: list[Result] = []
    versions = [v for v in (versions or VERSIONS) if os.path.isdir(os.path.join(root, v))]
    for name in only or CHECKERS:
        try:
            mod = importlib.import_module(f"cosyjax.parity.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"cosyjax.parity.{name}":
                results.append(Result("-", name, "(checker)", float("nan"), float("nan"), 0.0, False,
                                      "checker not implemented"))
                continue
            raise
        targets = versions if getattr(mod, "PER_VERSION", True) else ["-"]
        for v in targets:
            ctx = FixtureContext(root, v)
            t0 = time.time()
            try:
                rows = mod.check(ctx)
            except Exception as e:  # a crash is a failed row, not a lost table
                if verbose:
                    traceback.print_exc()
                rows = [Result(v, name, "(error)", float("nan"), float("nan"), 0.0, False,
                               f"{type(e).__name__}: {e}".splitlines()[0][:200])]
            if verbose:
                print(f"[{name} {v}] {len(rows)} rows in {time.time() - t0:.1f} s", file=sys.stderr)
            results.extend(rows)
    return results


def format_table(results: list[Result]) -> str:
    head = f"{'version':<11} {'component':<9} {'output':<42} {'rel-L2':>10} {'max-abs':>10} {'tol':>8}  result"
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r.version:<11} {r.component:<9} {r.output:<42} {r.rel_l2:>10.3e} {r.max_abs:>10.3e} "
                     f"{r.tol:>8.0e}  {'PASS' if r.passed else 'FAIL'}" + (f"  ({r.note})" if r.note else ""))
    n_fail = sum(not r.passed for r in results)
    lines.append(f"{len(results) - n_fail} passed, {n_fail} failed")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cosyjax.parity", description=__doc__)
    ap.add_argument("root", help="fixture root laid out like ../shared/golden")
    ap.add_argument("--only", default="", help="comma-separated subset of " + ",".join(CHECKERS))
    ap.add_argument("--versions", default="", help="comma-separated subset of " + ",".join(VERSIONS))
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    if not os.path.isdir(args.root):
        print(f"error: fixture root not found: {args.root}", file=sys.stderr)
        return 2
    only = [s for s in args.only.split(",") if s] or None
    versions = [s for s in args.versions.split(",") if s] or None
    results = run(args.root, only, versions, args.verbose)
    print(format_table(results))
    if not results:
        print("error: no fixtures found", file=sys.stderr)
        return 1
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
