"""What each runtime release can do with a seccomp adjustment (docs: nri-protocol.md).

| containerd | NRI | applies seccomp_policy | passes seccomp_profile | errno_ret safe |
|---|---|---|---|---|
| < 2.2 | <= 0.8 | no (unknown field, dropped) | no | - |
| 2.2.0 | 0.10 | yes | no | no (panics) |
| 2.2.1 - 2.2.x | 0.11 | yes | yes | no (panics) |
| >= 2.3 | >= 0.12 | yes | yes | yes |

``default_errno`` is dropped by every NRI release up to v0.12.2. An unknown
runtime gets the most conservative answer: its adjustments are assumed dropped,
so annotated containers are refused rather than silently left unconfined.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass

_VERSION = re.compile(r"^v?(\d+)\.(\d+)(?:\.(\d+))?")


@dataclass(frozen=True)
class RuntimeCaps:
    applies_seccomp_adjustment: bool
    passes_seccomp_profile: bool
    errno_ret_safe: bool
    keeps_default_errno: bool
    passes_image: bool
    description: str


def parse_version(text: str) -> tuple[int, int, int] | None:
    """"v2.2.4", "2.3.0", "v2.2.0-rc.1", "v2.2.4-12-gdeadbee", "2.2.0+unknown" → (2, 2, 4)."""
    m = _VERSION.match(text.strip())
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def capabilities(
    runtime_name: str,
    runtime_version: str,
    nri_version: str = "",
    overrides: Mapping[str, bool] | None = None,
) -> RuntimeCaps:
    caps = _table(runtime_name, runtime_version, nri_version)
    if overrides:
        names = {f.name for f in dataclasses.fields(RuntimeCaps)} - {"description"}
        for key in overrides:
            if key not in names:
                raise ValueError(f"unknown runtime capability {key!r}: expected one of "
                                 + ", ".join(sorted(names)))
        caps = dataclasses.replace(
            caps, **overrides, description=f"{caps.description} with overrides {dict(overrides)}"
        )
    return caps


def _table(name: str, version: str, nri_version: str) -> RuntimeCaps:
    label = f"{name or 'unknown runtime'} {version or '(no version)'}"
    nri = parse_version(nri_version) if nri_version else None
    if name != "containerd":
        return _conservative(f"{label} (not containerd: seccomp support unknown)")
    v = parse_version(version)
    if v is None:
        return _conservative(f"{label} (version not understood)")
    if nri is None:
        nri = (0, 12, 0) if v >= (2, 3, 0) else (0, 11, 0) if v >= (2, 2, 1) else \
            (0, 10, 0) if v >= (2, 2, 0) else (0, 8, 0)
    described = f"{label} (NRI v{nri[0]}.{nri[1]}.{nri[2]})"
    return RuntimeCaps(
        applies_seccomp_adjustment=v >= (2, 2, 0),
        passes_seccomp_profile=v >= (2, 2, 1),
        errno_ret_safe=nri >= (0, 12, 0),
        keeps_default_errno=nri > (0, 12, 2),
        passes_image=nri >= (0, 12, 2),
        description=described,
    )


def _conservative(description: str) -> RuntimeCaps:
    return RuntimeCaps(
        applies_seccomp_adjustment=False,
        passes_seccomp_profile=False,
        errno_ret_safe=False,
        keeps_default_errno=False,
        passes_image=False,
        description=description,
    )
