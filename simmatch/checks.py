"""One check's outcome, shared by the pre-flight (`tools/train.py --check`, run/preflight.py) and
the self-test (`tools/selftest.py`, selftest/): each prints its own one-line form of it."""
from __future__ import annotations

from dataclasses import dataclass

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"


@dataclass
class Check:
    """`reason` says what was seen (figures included); `fix` what to do about a FAIL or SKIP."""

    name: str
    status: str
    reason: str
    fix: str = ""

    @property
    def ok(self) -> bool:
        return self.status != FAIL

    def line(self) -> str:
        """The self-test's form: `PASS  name  reason  [fix: ...]`."""
        text = f"{self.status}  {self.name:<16} {self.reason}"
        if self.fix and self.status != PASS:
            text += f"  [fix: {self.fix}]"
        return text
