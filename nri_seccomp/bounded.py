"""Text from outside (registries, pod authors) made safe to quote in a message or a log line."""

from __future__ import annotations

import re

# C0 and C1 controls, DEL, zero-width and bidirectional formatting characters,
# line and paragraph separators: nothing that can forge or hide part of a line
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")


def quote_untrusted(value: object, limit: int = 100) -> str:
    """``value`` as text of at most ``limit`` characters, without control characters.

    A cut is marked with a trailing "…" (counted in the limit). Bytes are decoded
    as UTF-8 with replacement. The work is bounded by the limit, not by the input.
    """
    if isinstance(value, bytes | bytearray):
        text = bytes(value[: limit * 8]).decode("utf-8", errors="replace")
    else:
        text = value if isinstance(value, str) else str(value)
    head = text[: limit * 4]
    cut = len(text) > len(head)
    head = _UNSAFE.sub("", head)
    if cut or len(head) > limit:
        head = head[: max(limit - 1, 0)] + "…"
    return head


__all__ = ["quote_untrusted"]
