"""Generate docs/configuration.md from the settings model, so the reference cannot drift.

    python docs/gen_config_reference.py           # rewrite docs/configuration.md
    python docs/gen_config_reference.py --check   # exit 1 when the committed file is stale

Every field of ``dermgate.settings.Settings`` (nested sections included) gets
its dotted name, environment variable, type, default and description. The
description is the field's ``description`` or else the comment at the end of
its line in the source, so a comment beside a setting is its documentation.
"""

from __future__ import annotations

import argparse
import ast
import enum
import inspect
import io
import json
import sys
import textwrap
import tokenize
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from audit.keys import KEY_ENV, SIGNING_KEY_ENV  # noqa: E402
from dermgate.store import KEY_ENV as STORE_KEY_ENV  # noqa: E402
from dermgate.settings import Settings  # noqa: E402

OUTPUT = ROOT / "docs" / "configuration.md"
GROUP_DIGITS_FROM = 1_000_000

# Descriptions for settings whose definition carries no comment or description.
# A comment beside the field in the source wins; tests check every key still names a setting.
DESCRIPTIONS: dict[str, str] = {
    "workdir": "where the SQLite database, the store, the audit trail and the logs live unless configured",
    "environment": "the kind of deployment",
    "log_level": "application log level (JSON lines, no PHI)",
    "dicom.ae_title": "the SCP's AE title (1-16 characters)",
    "dicom.host": "address the SCP listens on (`0.0.0.0` in containers)",
    "dicom.port": "plain DICOM port",
    "dicom.allowed_callers": "calling AE titles and their source addresses that may associate",
    "dicom.max_associations": "concurrent associations per SCP process",
    "dicom.acse_timeout": "seconds to wait for association messages",
    "dicom.dimse_timeout": "seconds to wait for DIMSE messages",
    "dicom.network_timeout": "seconds of network silence before an association is aborted",
    "dicom.max_pdu": "maximum PDU size offered, bytes",
    "dicom.destinations": "PACS that receive the Grad-CAM Secondary Capture and the AI Result SR",
    "dicom.allowed_callers[].ae_title": "calling AE title",
    "dicom.allowed_callers[].hosts": "source IP addresses it may connect from",
    "dicom.tls.enabled": "also listen for DICOM over TLS (TLS 1.2 minimum)",
    "dicom.tls.cert_file": "the SCP's certificate (PEM)",
    "dicom.tls.key_file": "its private key (PEM)",
    "dicom.tls.require_client_cert": "mutual TLS: refuse callers without a certificate from `ca_file`",
    "dicom.destinations[].name": "a name for logs, metrics and the outbox channel",
    "dicom.destinations[].ae_title": "the destination's AE title",
    "dicom.destinations[].host": "host name or address",
    "dicom.destinations[].port": "port",
    "dicom.destinations[].tls": "connect with DICOM TLS",
    "worker.lease_seconds": "how long a claimed job or outbox row stays leased to its worker",
    "worker.max_attempts": "attempts before a job becomes a dead letter (`failed`)",
    "worker.backoff_base_s": "first retry delay; doubles per attempt",
    "worker.backoff_max_s": "longest retry delay",
    "worker.poll_interval_s": "idle wait between queue polls",
    "worker.batch_size": "rows claimed per poll",
    "audit.signing_key_file": "Ed25519 key that signs checkpoints (default beside the key file)",
    "audit.checkpoint_every": "records between signed checkpoints",
    "audit.syslog_host": "SIEM receiving IHE ATNA audit messages (syslog over TLS, RFC 5425)",
    "audit.syslog_port": "its port",
    "audit.syslog_ca_file": "CA that signed the SIEM's certificate",
    "api.host": "address the HTTP API listens on (`0.0.0.0` in containers)",
    "api.port": "HTTP port: /healthz, /readyz, /metrics, results and review",
}
WORKDIR_PLACEHOLDER = Path("<workdir>")
GENERATOR = "docs/gen_config_reference.py"


@dataclass(frozen=True)
class Row:
    setting: str
    env: str
    type: str
    default: str
    description: str


# ---- reading the model -------------------------------------------------------------------------

def env_prefix() -> str:
    return str(Settings.model_config.get("env_prefix", ""))


def env_delimiter() -> str:
    return str(Settings.model_config.get("env_nested_delimiter", "__"))


def env_name(path: tuple[str, ...]) -> str:
    return (env_prefix() + env_delimiter().join(path)).upper()


def unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    """(the type inside ``X | None``, whether None is allowed)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return annotation, False


def model_in(annotation: Any) -> type[BaseModel] | None:
    inner, _ = unwrap_optional(annotation)
    return inner if isinstance(inner, type) and issubclass(inner, BaseModel) else None


def list_item_model(annotation: Any) -> type[BaseModel] | None:
    inner, _ = unwrap_optional(annotation)
    if typing.get_origin(inner) is list:
        (item,) = typing.get_args(inner) or (None,)
        return item if isinstance(item, type) and issubclass(item, BaseModel) else None
    return None


def type_text(annotation: Any) -> str:
    inner, optional = unwrap_optional(annotation)
    origin = typing.get_origin(inner)
    if origin in (typing.Union, types.UnionType):
        text = " or ".join(type_text(a) for a in typing.get_args(inner))
    elif origin is typing.Literal:
        text = "one of " + ", ".join(f"`{a}`" for a in typing.get_args(inner))
    elif isinstance(inner, type) and issubclass(inner, enum.Enum):
        text = "one of " + ", ".join(f"`{m.value}`" for m in inner)
    elif origin is list:
        (item,) = typing.get_args(inner) or (Any,)
        text = f"list of {type_text(item)} (JSON in env)"
    elif origin is dict:
        key, value = typing.get_args(inner) or (Any, Any)
        text = f"map {type_text(key)} → {type_text(value)} (JSON in env)"
    elif isinstance(inner, type) and issubclass(inner, Path):
        text = "path"
    elif inner in (str, int, float, bool):
        text = inner.__name__
    elif getattr(inner, "__name__", "") in ("HttpUrl", "AnyUrl", "AnyHttpUrl", "Url"):
        text = "URL"
    else:
        text = getattr(inner, "__name__", str(inner)).replace("typing.", "")
    return text + (" or unset" if optional else "")


def default_value(field: FieldInfo) -> Any:
    if field.default_factory is not None:
        return field.default_factory()  # type: ignore[call-arg]
    return field.default


def default_text(field: FieldInfo) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = default_value(field)
    if value is None:
        return "unset"
    if isinstance(value, Path) and value == Path.cwd():
        return "the current directory"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, (list, dict)):
        return f"`{json.dumps(value)}`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, int) and abs(value) >= GROUP_DIGITS_FROM:
        return f"`{value}` ({value:_})".replace("_", "\u202f")
    return f"`{value}`"


def constraints_text(field: FieldInfo) -> str:
    words = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<", "min_length": "length ≥", "max_length": "length ≤"}
    parts = [f"{sym} {getattr(m, name)}" for m in field.metadata for name, sym in words.items()
             if getattr(m, name, None) is not None]
    return ("; " if parts else "") + ", ".join(parts)


def line_comments(cls: type) -> dict[str, str]:
    """Field name -> the comment at the end of its definition in the class source."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    spans: dict[int, str] = {}
    for node in ast.parse(source).body[0].body:  # type: ignore[attr-defined]
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            for line in range(node.lineno, (node.end_lineno or node.lineno) + 1):
                spans[line] = node.target.id
    comments: dict[str, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and tok.start[0] in spans and not tok.line.lstrip().startswith("#"):
            text = tok.string.lstrip("#").strip()
            if not text.startswith(("noqa", "type:")):
                comments.setdefault(spans[tok.start[0]], text)
    return comments


def describe(cls: type, name: str, field: FieldInfo, dotted: str) -> str:
    text = field.description or line_comments(cls).get(name, "") or DESCRIPTIONS.get(dotted, "")
    return (text + constraints_text(field)).replace("|", "\\|")


def setting_paths() -> set[str]:
    """Every dotted setting name the page documents (for checking DESCRIPTIONS)."""
    return {r.setting.strip("`") for _, _, _, rows in sections(Settings) for r in rows}


def sections(model: type[BaseModel], path: tuple[str, ...] = (), *, in_list: bool = False
             ) -> Iterator[tuple[tuple[str, ...], type[BaseModel], bool, list[Row]]]:
    """(path, model, inside a list, rows) for ``model`` and then each nested section."""
    rows: list[Row] = []
    nested: list[tuple[tuple[str, ...], type[BaseModel], bool]] = []
    for name, field in model.model_fields.items():
        sub, item = model_in(field.annotation), list_item_model(field.annotation)
        dotted = ".".join((*path, name)) if not in_list else ".".join((*path[:-1], path[-1] + "[]", name))
        env = "" if in_list else f"`{env_name((*path, name))}`"
        if sub is not None and not in_list:
            nested.append(((*path, name), sub, False))
            continue
        if item is not None:
            nested.append(((*path, name), item, True))
            rows.append(Row(f"`{dotted}`", env, f"list of `{dotted}[]` entries (JSON in env)",
                            default_text(field), describe(model, name, field, dotted)))
            continue
        rows.append(Row(f"`{dotted}`", env, type_text(field.annotation), default_text(field),
                        describe(model, name, field, dotted)))
    yield path, model, in_list, rows
    for sub_path, sub_model, sub_in_list in nested:
        yield from sections(sub_model, sub_path, in_list=sub_in_list or in_list)


def derived_locations() -> list[tuple[str, str]]:
    """Settings properties that compute locations from the work dir, with their values."""
    settings = Settings.model_construct(workdir=WORKDIR_PLACEHOLDER)
    out = []
    for name, member in inspect.getmembers(Settings, lambda m: isinstance(m, property)):
        if name.startswith("_") or name in BaseModel.__dict__:
            continue
        try:
            value = member.fget(settings)  # type: ignore[misc]
        except Exception:  # noqa: BLE001 - a property that needs real settings is skipped
            continue
        if isinstance(value, (str, Path)):
            text = str(value).replace(str(WORKDIR_PLACEHOLDER.resolve()), str(WORKDIR_PLACEHOLDER))
            out.append((name, text))
    return out


# ---- writing the page --------------------------------------------------------------------------

def table(rows: list[Row], in_list: bool) -> str:
    if in_list:
        lines = ["| Setting | Type | Default | Description |", "| --- | --- | --- | --- |"]
        lines += [f"| {r.setting} | {r.type} | {r.default} | {r.description} |" for r in rows]
    else:
        lines = ["| Setting | Environment variable | Type | Default | Description |",
                 "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r.setting} | {r.env} | {r.type} | {r.default} | {r.description} |" for r in rows]
    return "\n".join(lines)


def render() -> str:
    delim = env_delimiter()
    out = [
        "# Configuration reference",
        "",
        f"<!-- Generated by {GENERATOR} from dermgate/settings.py: do not edit by hand; "
        f"run `python {GENERATOR}`. -->",
        "",
        "dermgate reads one settings object. Sources, highest first:",
        "",
        "1. command-line options (`--workdir`),",
        f"2. environment variables `{env_prefix()}*`, nested with `{delim}` "
        f"(`{env_name(('dicom', 'tls', 'enabled'))}=true`); lists and maps as JSON,",
        "3. the TOML file named by `DERMGATE_CONFIG`, else `<workdir>/dermgate.toml`, with one table per "
        "section (`[dicom]`, `[dicom.tls]`, `[[dicom.allowed_callers]]`),",
        "4. the defaults below.",
        "",
        "Unknown keys are refused at start. Secrets are never settings: a setting names the *file* "
        "that holds a key, and the audit keys may also come from the environment (below). "
        "`dermgate config` prints the effective settings.",
        "",
        "Example (`dermgate.toml`):",
        "",
        "```toml",
        'database_url = "postgresql+psycopg2://dermgate@db.hospital.example/dermgate"',
        "",
        "[dicom]",
        'ae_title = "DERMGATE"',
        "",
        "[[dicom.allowed_callers]]",
        'ae_title = "DERMSCOPE01"',
        'hosts = ["192.0.2.10"]',
        "```",
        "",
    ]
    for path, model, in_list, rows in sections(Settings):
        if not rows:
            continue
        title = "Top level" if not path else "`" + ".".join(path) + ("[]`" if in_list else "`")
        out += [f"## {title}", ""]
        doc = inspect.getdoc(model) if model.__doc__ else None
        if doc and path:
            out += [doc.split("\n\n")[0].replace("\n", " "), ""]
        if in_list:
            out += [f"Each entry of the list `{'.'.join(path)}`; in the environment the whole list is one "
                    f"JSON value of `{env_name(path)}`.", ""]
        out += [table(rows, in_list), ""]
    derived = derived_locations()
    if derived:
        out += ["## Derived locations", "",
                "Computed from the settings above; not settings themselves.", "",
                "| Name | Value |", "| --- | --- |"]
        out += [f"| `{name}` | `{value}` |" for name, value in derived]
        out.append("")
    out += [
        "## Other environment variables",
        "",
        "| Variable | Meaning |",
        "| --- | --- |",
        "| `DERMGATE_CONFIG` | the TOML settings file (default `<workdir>/dermgate.toml` when it exists) |",
        f"| `{KEY_ENV}` | the audit keyring (JSON, base64 of it, or one base64 AES-256 key); "
        "takes precedence over `audit.key_file` |",
        f"| `{SIGNING_KEY_ENV}` | the audit signing key (Ed25519 PKCS#8 PEM, or base64 of the 32-byte seed); "
        "takes precedence over `audit.signing_key_file` |",
        f"| `{STORE_KEY_ENV}` | the store keyring (JSON, base64 of it, or one base64 AES-256 key) that encrypts "
        "received objects, outputs and FHIR bundle files at rest; takes precedence over `store.key_file` |",
        "",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/configuration.md is out of date")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is out of date: run python {GENERATOR}", file=sys.stderr)
            return 1
        return 0
    args.output.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
