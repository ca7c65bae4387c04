"""The self-test's report: every rank's check outcomes merged into one, its summary and exit code."""
from __future__ import annotations

from simmatch.checks import FAIL, PASS, SKIP, Check

__all__ = ["FAIL", "PASS", "SKIP", "Check", "exit_code", "merge", "summary"]


def merge(per_rank: list[list[Check]]) -> list[Check]:
    """One check per name over all ranks: FAIL if any rank failed (the first one is named),
    SKIP if every rank skipped, else rank 0's outcome."""
    merged = []
    for i, first in enumerate(per_rank[0]):
        outcomes = [checks[i] for checks in per_rank]
        failed = [(r, c) for r, c in enumerate(outcomes) if c.status == FAIL]
        if failed:
            r, c = failed[0]
            where = f"rank {r}: " if len(per_rank) > 1 else ""
            more = f" (and {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
            merged.append(Check(c.name, FAIL, f"{where}{c.reason}{more}", c.fix))
        elif all(c.status == SKIP for c in outcomes):
            merged.append(first)
        else:
            merged.append(next(c for c in outcomes if c.status == PASS))
    return merged


def summary(checks: list[Check], world: int, device: str) -> str:
    count = {s: sum(c.status == s for c in checks) for s in (PASS, FAIL, SKIP)}
    skipped = ", ".join(c.name for c in checks if c.status == SKIP)
    tail = f" (skipped: {skipped})" if skipped else ""
    return (f"selftest: {count[PASS]} passed, {count[FAIL]} failed, {count[SKIP]} skipped on "
            f"{world} rank(s), {device}{tail}")


def exit_code(checks: list[Check]) -> int:
    """0 only if every check that ran passed."""
    return 1 if any(c.status == FAIL for c in checks) else 0
