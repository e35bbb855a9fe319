"""`python -m cosyjax.parity FIXTURE_ROOT [--only hift,flow] [--versions cosyvoice3] [--cases sft_stream.npz]`.

Runs every fixture folder the checkers know and prints one row per compared output, then a summary
per group (rows, worst rel-L2). What a folder must produce comes from its `meta.json`: a listed file,
array or case that is absent, or a listed array no row reads, is a failing row that names it. Folders
without a checker are printed as `not checked` rows. Exits non-zero on any failure.
"""
from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import time
import traceback

from cosyjax.parity.core import FixtureContext, Result, failure, listing, missing_rows, not_checked, unread_rows

CHECKERS = ("hift", "flow", "llm", "frontend", "e2e", "e2e_modes", "train")
VERSIONS = ("cosyvoice2", "cosyvoice3")
# folders that are not fixtures of a checker: what they feed, shown in their `not checked` row
_NOT_FIXTURES = {"modeldir": None}  # the model folder every checker loads
_FOLDER_NOTES = {  # folders the parity checkers do not read, and what does
    "common": "seed-0 flow noise buffer: the flow regenerates it; compared by tests/test_noise.py",
    "hift_key_variants": "hift.pt key-layout variants: compared by tests/test_hift_convert.py",
}


def _checker(name: str):
    """The checker module, or None when `cosyjax/parity/<name>.py` does not exist (yet)."""
    try:
        return importlib.import_module(f"cosyjax.parity.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"cosyjax.parity.{name}":
            return None
        raise


def _folder_of(mod, name: str) -> str:
    return getattr(mod, "FOLDER", name) if mod is not None else name


def _run_folder(mod, name: str, root: str, v: str, cases, verbose: bool) -> list[Result]:
    per_version = getattr(mod, "PER_VERSION", True)
    folder = os.path.join(root, v, _folder_of(mod, name)) if per_version else os.path.join(root, _folder_of(mod, name))
    if not os.path.isdir(folder):
        return [not_checked(v, name, f"no {os.path.relpath(folder, root)}/ in this fixture set")]
    try:
        lst = listing(folder, getattr(mod, "DEFAULT_NPZ", None))
    except FileNotFoundError:
        return [failure(v, name, "meta.json (missing)", f"{os.path.relpath(folder, root)}/ has no meta.json: "
                        "nothing says what it must contain")]
    except ValueError as e:  # unreadable meta.json (bad JSON, an arrays table without a file)
        return [failure(v, name, "meta.json (unreadable)", str(e)[:200])]
    rows = missing_rows(v, name, lst)
    ctx = FixtureContext(root, v, cases=tuple(cases) if cases else None)
    t0 = time.time()
    try:
        computed = mod.check(ctx)
    except Exception as e:  # a crash is a failed row, not a lost table
        if verbose:
            traceback.print_exc()
        return rows + [failure(v, name, "(error)", f"{type(e).__name__}: {e}".splitlines()[0][:200])]
    if verbose:
        print(f"[{name} {v}] {len(computed)} rows in {time.time() - t0:.1f} s", file=sys.stderr)
    select = getattr(mod, "selected_files", None)
    if select is not None:
        lst = select(ctx, lst)
    return rows + computed + unread_rows(v, name, lst, ctx.reads, getattr(mod, "UNUSED", None))


def _unclaimed(root: str, versions, claimed_root: set, claimed_version: set) -> list[Result]:
    rows = []
    for d in sorted(os.listdir(root)):
        if os.path.isdir(os.path.join(root, d)) and d not in VERSIONS and d not in claimed_root:
            rows.append(not_checked("-", d, _FOLDER_NOTES.get(d, "no parity checker reads this folder")))
    for v in versions:
        for d in sorted(os.listdir(os.path.join(root, v))):
            if os.path.isdir(os.path.join(root, v, d)) and d not in claimed_version and d not in _NOT_FIXTURES:
                rows.append(not_checked(v, d, "no parity checker reads this folder"))
    return rows


def run(root: str, only=None, versions=None, verbose=False, cases=None) -> list[Result]:
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    unknown = [n for n in (only or ()) if n not in CHECKERS]
    if unknown:
        raise SystemExit(f"error: unknown checker(s) {unknown}; choose from {','.join(CHECKERS)}")
    results: list[Result] = []
    versions = [v for v in (versions or VERSIONS) if os.path.isdir(os.path.join(root, v))]
    claimed_root, claimed_version = set(), set()
    for name in CHECKERS:
        mod = _checker(name)
        per_version = getattr(mod, "PER_VERSION", True)
        (claimed_version if per_version else claimed_root).add(_folder_of(mod, name))
        if only and name not in only:
            continue
        for v in versions if per_version else ["-"]:
            if mod is None:
                results.append(not_checked(v, name, f"checker cosyjax/parity/{name}.py not written yet"))
                continue
            results.extend(_run_folder(mod, name, root, v, cases, verbose))
    if not only:
        results.extend(_unclaimed(root, versions, claimed_root, claimed_version))
    return results


def _status(r: Result) -> str:
    return "not checked" if not r.checked else ("PASS" if r.passed else "FAIL")


def format_table(results: list[Result]) -> str:
    w = max([9] + [len(r.component) for r in results])
    head = f"{'version':<11} {'component':<{w}} {'output':<46} {'rel-L2':>10} {'max-abs':>10} {'tol':>8}  result"
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r.version:<11} {r.component:<{w}} {r.output:<46} {r.rel_l2:>10.3e} {r.max_abs:>10.3e} "
                     f"{r.tol:>8.0e}  {_status(r)}" + (f"  ({r.note})" if r.note else ""))
    n_skip = sum(not r.checked for r in results)
    n_fail = sum(r.checked and not r.passed for r in results)
    lines.append(f"{len(results) - n_fail - n_skip} passed, {n_fail} failed, {n_skip} not checked")
    return "\n".join(lines)


def format_summary(results: list[Result]) -> str:
    """Per (version, component): rows, failures and the worst rel-L2 among the tolerance rows."""
    groups: dict = {}
    for r in results:
        if r.checked:
            groups.setdefault((r.version, r.component), []).append(r)
    head = f"{'version':<11} {'component':<9} {'rows':>5} {'failed':>6} {'worst rel-L2':>13} {'(its tol)':>9}  worst output"
    lines = ["", head, "-" * len(head)]
    for (v, c), rows in groups.items():
        measured = [r for r in rows if r.tol > 0 and math.isfinite(r.rel_l2)]
        worst = max(measured, key=lambda r: r.rel_l2 / r.tol, default=None)
        lines.append(f"{v:<11} {c:<9} {len(rows):>5} {sum(not r.passed for r in rows):>6} "
                     + (f"{worst.rel_l2:>13.3e} {worst.tol:>9.0e}  {worst.output}" if worst else f"{'-':>13} {'':>9}"))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cosyjax.parity", description=__doc__)
    ap.add_argument("root", help="fixture root laid out like ../shared/golden")
    ap.add_argument("--only", default="", help="comma-separated subset of " + ",".join(CHECKERS))
    ap.add_argument("--versions", default="", help="comma-separated subset of " + ",".join(VERSIONS))
    ap.add_argument("--cases", default="", help="comma-separated e2e_modes case names to run (default: every "
                    "listed case; missing listed files are reported either way)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    if not os.path.isdir(args.root):
        print(f"error: fixture root not found: {args.root}", file=sys.stderr)
        return 2
    only = [s for s in args.only.split(",") if s] or None
    versions = [s for s in args.versions.split(",") if s] or None
    cases = [s for s in args.cases.split(",") if s] or None
    results = run(args.root, only, versions, args.verbose, cases)
    print(format_table(results))
    print(format_summary(results))
    if not any(r.checked for r in results):
        print("error: no fixtures found", file=sys.stderr)
        return 1
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
