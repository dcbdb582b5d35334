"""Bounds on text that crosses a trust boundary: status messages, quoted values, log lines.

Pod annotations are written by tenants and registries answer whatever their
owners like. Anything they say that we repeat (a media type in an error, a URL,
a profile's key) goes through :func:`quote_untrusted`: cut short and stripped
of control characters, so it can neither forge a log line nor grow an answer.
Every status message the runtime receives is cut by :func:`status_message` in
the one place that encodes error answers (``ttrpc.error_response``): an answer
that does not fit the runtime's 4 MiB frame cannot be sent at all, and the
runtime then drops the plugin from the node. Log records are cut by
:class:`BoundedFormatter`.
"""

from __future__ import annotations

import logging
import time
from urllib.parse import urlsplit, urlunsplit

#: bytes of a status message the runtime receives (containerd shows it to the pod's author)
MAX_STATUS = 2048
#: characters of one log line (a traceback counts as part of its line)
MAX_LOG = 4096
#: characters of one value quoted from a registry, a profile or an annotation
MAX_QUOTED = 100


def clean(text: str) -> str:
    """``text`` with every control or non-printable character replaced by its escape."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def cut(text: str, limit: int) -> str:
    """At most ``limit`` characters, saying how many more there were."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit} more characters cut)"


def quote_untrusted(value: object, limit: int = MAX_QUOTED) -> str:
    """A value someone else chose, quoted for a message: cut, then cleaned, then quoted."""
    text = value if isinstance(value, str) else str(value)
    # cut before cleaning: cleaning a 4 MiB string first would be the expensive part
    head = text[:limit]
    shown = "'" + clean(head) + "'"
    if len(text) > limit:
        shown += f"… ({len(text) - limit} more characters cut)"
    return shown


def quote_untrusted_tail(value: object, limit: int = MAX_QUOTED) -> str:
    """Like :func:`quote_untrusted`, but keeps the end: for texts that put their cause
    last (gRPC's "…; last error: …: connect failed: …: No such file or directory")."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return "'" + clean(text) + "'"
    return f"({len(text) - limit} characters cut) …'" + clean(text[-limit:]) + "'"


def strip_query(url: str) -> str:
    """A URL without its query and fragment: pre-signed URLs carry their signatures there."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return quote_untrusted(url)
    return clean(urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")))


def status_message(message: str, limit: int = MAX_STATUS) -> str:
    """A status message that always fits: one line, at most ``limit`` bytes of UTF-8."""
    text = clean(message)
    raw = text.encode("utf-8", "replace")
    if len(raw) <= limit:
        return text
    head = raw[: limit - 48].decode("utf-8", "ignore")
    return f"{head}… ({len(raw) - len(head.encode())} more bytes cut)"


class BoundedFormatter(logging.Formatter):
    """One log record = one line of at most :data:`MAX_LOG` characters.

    Newlines in the message are escaped so that text from a registry cannot
    start a forged line; a traceback keeps its lines but is cut too.

    The plugin writes a line per container decision, thousands a second under
    load, and the generic path (a ``%`` format over the record's ``__dict__``, a
    ``strftime`` per record) cost more than the decision itself. With the
    default format (:data:`LINE_FORMAT`) a record is joined directly, and the
    time stamp's text is computed once per second.
    """

    def __init__(self, fmt: str | None = None, limit: int = MAX_LOG) -> None:
        super().__init__(fmt)
        self.limit = limit
        self._fast = fmt == LINE_FORMAT
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        if not self._fast or record.exc_info or record.exc_text or record.stack_info:
            return super().format(record)
        record.message = record.getMessage()
        return self.line(record.created, record.levelname, record.name, record.message)

    def line(self, created: float, level: str, name: str, message: str,
             clean_head: str = "") -> str:
        """The default format's line, from its parts; the message is ``clean_head`` (text
        that went through :func:`clean` already) followed by ``message``.

        Cleaning is most of a line's cost (``str.isprintable`` looks at every
        character): a message's fixed part is cleaned once by its caller, and only
        what changes from line to line (a pod's name) is looked at here."""
        second = int(created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime(self.default_time_format, self.converter(second))
        # level and name are ours, and clean; the time stamp too
        text = (f"{self._stamp},{MILLIS[int((created - second) * 1000)]} {level} {name}: "
                f"{clean_head}{message if message.isprintable() else clean(message)}")
        return text if len(text) <= self.limit else cut(text, self.limit)

    def formatMessage(self, record: logging.LogRecord) -> str:
        return cut(clean(super().formatMessage(record)), self.limit)

    def formatException(self, ei: object) -> str:
        return cut(super().formatException(ei), self.limit)  # type: ignore[arg-type]


#: ",000" to ",999": a table is cheaper than a format per line
MILLIS = tuple(f"{ms:03d}" for ms in range(1000))

#: the plugin's line: time, level, logger, message (syslog adds its own time)
LINE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
