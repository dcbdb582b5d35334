"""How many examples a property test runs: all of them in the whole suite (``./dev.sh
test``, CI), a tenth in the fast subset (``pytest -m "not integration"``), which is a
quick loop while working, not the check that lands."""

from __future__ import annotations

FAST = False


def examples(n: int) -> int:
    return max(n // 10, 25) if FAST else n
