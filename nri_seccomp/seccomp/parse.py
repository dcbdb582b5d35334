"""JSON bytes → a validated :class:`~nri_seccomp.seccomp.model.Profile`.

Validation is stricter than Docker's or CRI-O's: a profile pulled from a registry
is untrusted input, and the runtimes accept many mistakes silently (an unknown
field is ignored, an ``errnoRet`` over 65535 becomes 0 so the call *succeeds*,
an oversized argument value wraps). Every such case is an error here, and every
error names the rule, the syscall and the field at fault.

A hostile profile must not fill or forge log lines either: every value a
message shows goes through :func:`show` (control characters removed, at most
``MAX_SHOWN`` characters) and :func:`rule_label`, which the later stages use for
their messages too.
"""

from __future__ import annotations

import errno as errno_mod
import json
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from nri_seccomp.seccomp.model import (
    ArchMapEntry,
    Condition,
    Profile,
    ProfileFieldError,
    ProfileSyntaxError,
    Rule,
    Selector,
)
from nri_seccomp.seccomp.vocabulary import (
    ACTIONS,
    ARCHES,
    CAPABILITIES,
    DOCKER_ARCHES,
    EPERM,
    ERRNO_ACTIONS,
    FLAGS,
    MAX_ARG_INDEX,
    MAX_ERRNO_RET,
    MAX_U64,
    OPS,
)

_TOP_FIELDS = frozenset(
    {
        "defaultAction",
        "defaultErrnoRet",
        "defaultErrno",  # errno name, informational (containers-common writes it)
        "architectures",
        "archMap",
        "flags",
        "listenerPath",
        "listenerMetadata",
        "syscalls",
    }
)
_RULE_FIELDS = frozenset(
    {"names", "name", "action", "errnoRet", "errno", "args", "includes", "excludes", "comment"}
)
_ARG_FIELDS = frozenset({"index", "value", "valueTwo", "op"})
_ARCHMAP_FIELDS = frozenset({"architecture", "subArchitectures"})
_SELECTOR_FIELDS = frozenset({"arches", "caps", "minKernel"})


def parse(data: bytes) -> Profile:
    """Validate a Docker/OCI seccomp profile; raise :class:`ProfileError` naming the fault."""
    try:
        doc = json.loads(
            data,
            object_pairs_hook=_no_duplicate_keys,
            parse_constant=_no_constant,
        )
    except _DuplicateKey as exc:
        raise ProfileSyntaxError(
            f"layer is not usable JSON: duplicate key {quote(exc.key)}"
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProfileSyntaxError(f"layer is not JSON: {exc}") from None
    except RecursionError:
        raise ProfileSyntaxError("layer is not JSON a profile can be: nested too deeply") from None
    if not isinstance(doc, dict):
        raise ProfileFieldError(
            f"profile must be a JSON object, not {_json_type(doc)}", field="(top level)"
        )
    _only_known(doc, _TOP_FIELDS, "", "profile")
    if "defaultAction" not in doc or doc["defaultAction"] in (None, ""):
        raise ProfileFieldError(
            "profile has no defaultAction (CRI-O would run such a container unconfined; "
            "we refuse it)",
            field="defaultAction",
        )
    default_action = _action(doc["defaultAction"], "defaultAction")
    if default_action == "SCMP_ACT_NOTIFY":
        raise ProfileFieldError(
            "defaultAction: SCMP_ACT_NOTIFY cannot be the default action", field="defaultAction"
        )
    default_errno = _opt_uint(doc.get("defaultErrnoRet"), "defaultErrnoRet", MAX_ERRNO_RET)
    if default_errno is not None and default_action not in ERRNO_ACTIONS:
        raise ProfileFieldError(
            f"defaultErrnoRet: {default_errno} has no effect with {default_action}; "
            "it only applies to SCMP_ACT_ERRNO and SCMP_ACT_TRACE",
            field="defaultErrnoRet",
        )
    _errno_name(doc.get("defaultErrno"), default_errno, default_action, "defaultErrno", None)

    architectures = tuple(
        _scmp_arch(a, f"architectures[{i}]")
        for i, a in enumerate(_list(doc.get("architectures"), "architectures"))
    )
    arch_map = tuple(
        _arch_map_entry(e, f"archMap[{i}]")
        for i, e in enumerate(_list(doc.get("archMap"), "archMap"))
    )
    if architectures and arch_map:
        raise ProfileFieldError(
            "architectures and archMap are both set; use one of them", field="archMap"
        )
    flags = tuple(
        _flag(f, f"flags[{i}]") for i, f in enumerate(_list(doc.get("flags"), "flags"))
    )
    listener_path = _opt_str(doc.get("listenerPath"), "listenerPath")
    listener_metadata = _opt_str(doc.get("listenerMetadata"), "listenerMetadata")
    rules = tuple(
        _rule(r, i) for i, r in enumerate(_list(doc.get("syscalls"), "syscalls"))
    )
    for r in rules:
        if r.action == "SCMP_ACT_NOTIFY" and not listener_path:
            raise ProfileFieldError(
                f"{rule_label(r.index, r.names)}: SCMP_ACT_NOTIFY needs listenerPath",
                field=f"syscalls[{r.index}].action",
                rule_index=r.index,
                names=r.names,
            )
    return Profile(
        default_action=default_action,
        default_errno_ret=default_errno,
        architectures=architectures,
        arch_map=arch_map,
        flags=flags,
        listener_path=listener_path,
        listener_metadata=listener_metadata,
        syscalls=rules,
    )


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json keeps the last of two equal keys; which one a runtime honours is a guess
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number with a fraction"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


_RuleCtx = tuple[int, Sequence[str]] | None


def rule_label(index: int, names: Sequence[str], sub: str = "") -> str:
    """``syscalls[3] (names: foo, bar)``: how every message names a rule."""
    label = f"syscalls[{index}]{sub}"
    if names:
        shown = ", ".join(show(n) for n in names[:5]) + (
            f", … ({len(names)} names)" if len(names) > 5 else ""
        )
        label += f" (names: {shown})"
    return label


#: the most of one profile value a message shows
MAX_SHOWN = 64
_CONTROL = dict.fromkeys([*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029])


def show(value: object) -> str:
    """A profile value fit for a message: control characters removed, at most MAX_SHOWN
    characters (a hostile profile must not fill or forge log lines)."""
    text = str(value).translate(_CONTROL)
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 1] + "…"


def quote(value: object) -> str:
    """:func:`show` in quotes, as messages quote a value the profile gave."""
    return repr(show(value))


def _fail(message: str, path: str, rule: _RuleCtx = None) -> NoReturn:
    if rule is None:
        raise ProfileFieldError(f"{path}: {message}", field=path)
    index, names = rule
    # label = the path up to its last [i], so a message reads
    # "syscalls[2].args[0] (names: socket): unknown op 'X'"
    cut = path.rfind("]") + 1
    label, rest = path[:cut], path[cut:].lstrip(".")
    if rest and rest.split("[")[0] not in message:
        message = f"{rest}: {message}"
    shown = label[len(f"syscalls[{index}]") :]
    raise ProfileFieldError(
        f"{rule_label(index, names, shown)}: {message}", field=path, rule_index=index, names=names
    )


def _only_known(
    obj: Mapping[str, Any],
    known: frozenset[str],
    path: str,
    what: str,
    rule: _RuleCtx = None,
) -> None:
    unknown = sorted(set(obj) - known)
    if unknown:
        lowered = {k.lower(): k for k in known}
        # at most five keys shown: a profile can have a million of them
        listed = ", ".join(
            quote(u) + (f" (did you mean {lowered[u.lower()]!r}?)" if u.lower() in lowered else "")
            for u in unknown[:5]
        ) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        plural = "s" if len(unknown) > 1 else ""
        msg = f"unknown {what} field{plural} {listed} (known: {', '.join(sorted(known))})"
        if not path:
            raise ProfileFieldError(msg, field=show(unknown[0]))
        _fail(msg, path, rule)


def _list(value: object, path: str, rule: _RuleCtx = None) -> list[Any]:
    # Go's encoding/json decodes null as an empty slice: accept it the same way
    if value is None:
        return []
    if not isinstance(value, list):
        _fail(f"must be an array, not {_json_type(value)}", path, rule)
    return value


def _opt_str(value: object, path: str, rule: _RuleCtx = None) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        _fail(f"must be a string, not {_json_type(value)}", path, rule)
    return value


def _str(value: object, path: str, rule: _RuleCtx = None) -> str:
    if not isinstance(value, str):
        _fail(f"must be a string, not {_json_type(value)}", path, rule)
    return value


def _uint(
    value: object, path: str, maximum: int, rule: _RuleCtx = None
) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(f"must be a non-negative integer, not {_json_type(value)}", path, rule)
    if value < 0:
        _fail(f"{show(value)} is negative", path, rule)
    if value > maximum:
        _fail(f"{show(value)} is out of range (maximum {maximum})", path, rule)
    return value


def _opt_uint(
    value: object, path: str, maximum: int, rule: _RuleCtx = None
) -> int | None:
    return None if value is None else _uint(value, path, maximum, rule)


def _action(value: object, path: str, rule: _RuleCtx = None) -> str:
    name = _str(value, path, rule)
    if name not in ACTIONS:
        _fail(f"unknown action {quote(name)} (known: {', '.join(ACTIONS)})", path, rule)
    return name


def _scmp_arch(value: object, path: str) -> str:
    name = _str(value, path)
    if name not in ARCHES:
        raise ProfileFieldError(
            f"{path}: unknown architecture {quote(name)} (known: {', '.join(ARCHES)})", field=path
        )
    return name


def _flag(value: object, path: str) -> str:
    name = _str(value, path)
    if name not in FLAGS:
        raise ProfileFieldError(
            f"{path}: unknown flag {quote(name)} (known: {', '.join(sorted(FLAGS))})", field=path
        )
    return name


def _arch_map_entry(value: object, path: str) -> ArchMapEntry:
    if not isinstance(value, dict):
        raise ProfileFieldError(f"{path}: must be an object, not {_json_type(value)}", field=path)
    _only_known(value, _ARCHMAP_FIELDS, path, "archMap")
    if "architecture" not in value:
        raise ProfileFieldError(f"{path}: architecture is missing", field=f"{path}.architecture")
    arch = _scmp_arch(value["architecture"], f"{path}.architecture")
    subs = tuple(
        _scmp_arch(s, f"{path}.subArchitectures[{i}]")
        for i, s in enumerate(_list(value.get("subArchitectures"), f"{path}.subArchitectures"))
    )
    return ArchMapEntry(arch, subs)


def _errno_name(
    value: object, number: int | None, action: str, path: str, ctx: _RuleCtx
) -> None:
    """Check the informational errno name against the number that takes effect."""
    if value is None:
        return
    name = _str(value, path, ctx)
    code = getattr(errno_mod, name, None) if name.startswith("E") else None
    if not isinstance(code, int):
        _fail(f"unknown errno name {quote(name)}", path, ctx)
    number_field = "defaultErrnoRet" if ctx is None else "errnoRet"
    if action not in ERRNO_ACTIONS:
        _fail(f"{name} has no effect with {action}", path, ctx)
    effective = EPERM if number is None else number
    if code != effective:
        if number is None:
            _fail(
                f"{name} is only a label: without {number_field} the runtime returns EPERM; "
                f"set {number_field}: {code}",
                path,
                ctx,
            )
        _fail(f"{name} ({code}) disagrees with {number_field} {number}", path, ctx)


def _rule(value: object, index: int) -> Rule:
    path = f"syscalls[{index}]"
    if not isinstance(value, dict):
        raise ProfileFieldError(
            f"{path}: must be an object, not {_json_type(value)}", field=path, rule_index=index
        )
    # names first, so every later message can say which rule this is
    has_names = value.get("names") not in (None, [])
    has_name = value.get("name") not in (None, "")
    if has_names and has_name:
        _fail("name and names are both set; use one of them", f"{path}.name", (index, ()))
    if has_name:
        names: tuple[str, ...] = (_str(value["name"], f"{path}.name", (index, ())),)
    else:
        names = tuple(
            _str(n, f"{path}.names[{i}]", (index, ()))
            for i, n in enumerate(_list(value.get("names"), f"{path}.names", (index, ())))
        )
    rule = (index, names)
    _only_known(value, _RULE_FIELDS, path, "rule", rule)
    for i, n in enumerate(names):
        if not n:
            _fail("empty syscall name", f"{path}.names[{i}]", rule)
    if not names:
        _fail("no syscall names (names is missing or empty)", f"{path}.names", rule)
    if "action" not in value:
        _fail("action is missing", f"{path}.action", rule)
    action = _action(value["action"], f"{path}.action", rule)
    errno_ret = _opt_uint(value.get("errnoRet"), f"{path}.errnoRet", MAX_ERRNO_RET, rule)
    if errno_ret is not None and action not in ERRNO_ACTIONS:
        _fail(
            f"errnoRet {errno_ret} has no effect with {action}; it only applies to "
            "SCMP_ACT_ERRNO and SCMP_ACT_TRACE",
            f"{path}.errnoRet",
            rule,
        )
    _errno_name(value.get("errno"), errno_ret, action, f"{path}.errno", rule)
    args = tuple(
        _condition(a, f"{path}.args[{i}]", rule)
        for i, a in enumerate(_list(value.get("args"), f"{path}.args", rule))
    )
    return Rule(
        names=names,
        action=action,
        errno_ret=errno_ret,
        args=args,
        includes=_selector(value.get("includes"), f"{path}.includes", rule),
        excludes=_selector(value.get("excludes"), f"{path}.excludes", rule),
        comment=_opt_str(value.get("comment"), f"{path}.comment", rule),
        index=index,
    )


def _condition(value: object, path: str, rule: tuple[int, Sequence[str]]) -> Condition:
    if not isinstance(value, dict):
        _fail(f"must be an object, not {_json_type(value)}", path, rule)
    _only_known(value, _ARG_FIELDS, path, "args", rule)
    for required in ("index", "op"):
        if required not in value:
            _fail(f"{required} is missing", f"{path}.{required}", rule)
    index = _uint(value["index"], f"{path}.index", MAX_ARG_INDEX, rule)
    op = _str(value["op"], f"{path}.op", rule)
    if op not in OPS:
        _fail(f"unknown op {quote(op)} (known: {', '.join(OPS)})", f"{path}.op", rule)
    # Go leaves an absent uint64 at 0; so does the runtime
    val = _uint(value.get("value", 0), f"{path}.value", MAX_U64, rule)
    val2 = _uint(value.get("valueTwo", 0), f"{path}.valueTwo", MAX_U64, rule)
    return Condition(index=index, value=val, op=op, value_two=val2)


def _selector(value: object, path: str, rule: tuple[int, Sequence[str]]) -> Selector:
    if value is None:
        return Selector()
    if not isinstance(value, dict):
        _fail(f"must be an object, not {_json_type(value)}", path, rule)
    _only_known(value, _SELECTOR_FIELDS, path, path.rsplit(".", 1)[-1], rule)
    arches = []
    for i, a in enumerate(_list(value.get("arches"), f"{path}.arches", rule)):
        name = _str(a, f"{path}.arches[{i}]", rule)
        if name not in DOCKER_ARCHES:
            _fail(
                f"unknown architecture {quote(name)} (known: {', '.join(sorted(DOCKER_ARCHES))})",
                f"{path}.arches[{i}]",
                rule,
            )
        arches.append(name)
    caps = []
    for i, c in enumerate(_list(value.get("caps"), f"{path}.caps", rule)):
        name = _str(c, f"{path}.caps[{i}]", rule)
        if name.upper() not in CAPABILITIES:
            _fail(f"unknown capability {quote(name)}", f"{path}.caps[{i}]", rule)
        caps.append(name.upper())
    min_kernel = None
    if value.get("minKernel") not in (None, ""):
        min_kernel = _kernel(value["minKernel"], f"{path}.minKernel", rule)
    return Selector(tuple(arches), tuple(caps), min_kernel)


def _kernel(value: object, path: str, rule: tuple[int, Sequence[str]]) -> tuple[int, int]:
    text = _str(value, path, rule)
    parts = text.split(".")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        _fail(f"{quote(text)} is not a kernel version of the form MAJOR.MINOR", path, rule)
    return int(parts[0]), int(parts[1])
