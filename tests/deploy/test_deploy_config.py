"""The configuration reference (docs/configuration.md) and the settings files shipped in deploy/."""

from __future__ import annotations

import enum
import json
import subprocess
import sys
import tomllib
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from dermgate.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "docs"))
import gen_config_reference as gen  # noqa: E402


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No DERMGATE_* variable and no dermgate.toml in reach: only what the test sets counts."""
    import os
    for name in list(os.environ):
        if name.upper().startswith("DERMGATE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def leaves(model: type[BaseModel], path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], FieldInfo]]:
    """Every setting reachable by its own environment variable (not entries inside lists)."""
    for name, field in model.model_fields.items():
        sub = gen.model_in(field.annotation)
        if sub is not None:
            yield from leaves(sub, (*path, name))
        else:
            yield (*path, name), field


def sample(annotation: Any, default: Any) -> tuple[str, Any] | None:
    """(environment text, the value Settings should then hold) that differs from the default."""
    inner, _ = gen.unwrap_optional(annotation)
    origin = typing.get_origin(inner)
    if origin in (typing.Union, types.UnionType):
        inner = typing.get_args(inner)[0]
        origin = typing.get_origin(inner)
    if inner is bool:
        return ("false", False) if default is True else ("true", True)
    if inner is int:
        return "17", 17
    if inner is float:
        return "2.5", 2.5
    if inner is str:
        return "X17", "X17"
    if isinstance(inner, type) and issubclass(inner, Path):
        return "/srv/dermgate-test", Path("/srv/dermgate-test")
    if isinstance(inner, type) and issubclass(inner, enum.Enum):
        member = [m for m in inner if m != default][-1]
        return member.value, member
    if origin is typing.Literal:
        value = [v for v in typing.get_args(inner) if v != default][-1]
        return str(value), value
    if origin is dict:
        return '{"k": "v"}', {"k": "v"}
    if origin is list and typing.get_args(inner) == (str,):
        return '["192.0.2.1"]', ["192.0.2.1"]
    if origin is list and typing.get_args(inner) == (int,):
        return "[7, 17]", [7, 17]
    if getattr(inner, "__name__", "") in ("HttpUrl", "AnyUrl", "AnyHttpUrl"):
        return "https://ehr.example.org/fhir", "https://ehr.example.org/fhir"
    return None


# Settings that are only valid together (SMART Backend Services needs all three).
_SMART = (("fhir", "token_url"), ("fhir", "client_id"), ("fhir", "private_key_file"))
TOGETHER: dict[tuple[str, ...], tuple[tuple[str, ...], ...]] = {p: tuple(q for q in _SMART if q != p) for p in _SMART}
TOGETHER[("dicom", "plain_listener")] = (("dicom", "tls", "enabled"),)   # off needs the TLS port
# The console's OpenID provider section exists only with its issuer and client id.
_OIDC_REQUIRED = (("console", "oidc", "issuer"), ("console", "oidc", "client_id"))
TOGETHER.update({p: tuple(q for q in _OIDC_REQUIRED if q != p) for p, _ in leaves(Settings)
                 if p[:2] == ("console", "oidc")})
# Values a generic sample would not pass (validated against a fixed vocabulary).
SAMPLES: dict[tuple[str, ...], tuple[str, Any]] = {
    ("console", "oidc", "role_map"): ('{"derm-group": "clinician"}', {"derm-group": "clinician"})}


def value_at(settings: Settings, path: tuple[str, ...]) -> Any:
    value: Any = settings
    for part in path:
        value = getattr(value, part)
    return value


def test_configuration_reference_is_up_to_date() -> None:
    """docs/configuration.md is what docs/gen_config_reference.py makes from dermgate/settings.py now."""
    proc = subprocess.run([sys.executable, str(ROOT / "docs" / "gen_config_reference.py"), "--check"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr + "\nregenerate: python docs/gen_config_reference.py"


def test_reference_lists_every_setting_with_its_environment_variable() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    for path, _ in leaves(Settings):
        assert f"| `{'.'.join(path)}` | `{gen.env_name(path)}` |" in text


def test_fallback_descriptions_name_existing_settings() -> None:
    assert set(gen.DESCRIPTIONS) <= gen.setting_paths()


@pytest.mark.parametrize("path", [p for p, f in leaves(Settings) if gen.list_item_model(f.annotation) is None],
                         ids=".".join)
def test_documented_environment_variable_sets_the_setting(path: tuple[str, ...], clean_env: pytest.MonkeyPatch
                                                          ) -> None:
    field = dict(leaves(Settings))[path]
    default = None if path == ("workdir",) else gen.default_value(field)
    pair = SAMPLES.get(path) or sample(field.annotation, default)
    if pair is None:
        pytest.fail(f"no sample value for {path} ({field.annotation}): extend sample() in this test")
    text, expected = pair
    for companion in TOGETHER.get(path, ()):
        other = dict(leaves(Settings))[companion]
        clean_env.setenv(gen.env_name(companion), sample(other.annotation, None)[0])  # type: ignore[index]
    clean_env.setenv(gen.env_name(path), text)
    value = value_at(Settings(), path)
    assert (str(value) if isinstance(expected, str) and not isinstance(value, str) else value) == expected


def test_list_settings_take_json_from_the_environment(clean_env: pytest.MonkeyPatch) -> None:
    callers = [{"ae_title": "DERMSCOPE01", "hosts": ["192.0.2.10"]}]
    clean_env.setenv(gen.env_name(("dicom", "allowed_callers")), json.dumps(callers))
    settings = Settings()
    assert [(c.ae_title, c.hosts) for c in settings.dicom.allowed_callers] == [("DERMSCOPE01", ["192.0.2.10"])]


def shipped_settings_files(tmp_path: Path) -> list[Path]:
    files = [ROOT / "deploy" / "compose" / "dermgate.toml"]
    for doc in yaml.safe_load_all((ROOT / "deploy" / "k8s" / "configmap.yaml").read_text(encoding="utf-8")):
        out = tmp_path / f"{doc['metadata']['name']}.toml"
        out.write_text(doc["data"]["dermgate.toml"], encoding="utf-8")
        files.append(out)
    return files


def unknown_keys(data: dict[str, Any], model: type[BaseModel], path: str = "") -> list[str]:
    """Keys of a settings file that name no setting (checked here whatever the models' extra policy)."""
    out = []
    for key, value in data.items():
        field = model.model_fields.get(key)
        if field is None:
            out.append(path + key)
            continue
        sub, item = gen.model_in(field.annotation), gen.list_item_model(field.annotation)
        if sub is not None and isinstance(value, dict):
            out += unknown_keys(value, sub, f"{path}{key}.")
        elif item is not None and isinstance(value, list):
            for entry in value:
                out += unknown_keys(entry, item, f"{path}{key}[].")
    return out


def test_settings_files_shipped_for_compose_and_kubernetes_are_valid(tmp_path: Path,
                                                                     clean_env: pytest.MonkeyPatch) -> None:
    """Unknown keys or wrong types would stop every pod at start; the settings model refuses both."""
    files = shipped_settings_files(tmp_path)
    assert len(files) == 2
    for path in files:
        assert unknown_keys(tomllib.loads(path.read_text(encoding="utf-8")), Settings) == [], path
        clean_env.setenv("DERMGATE_CONFIG", str(path))
        settings = Settings()
        assert settings.dicom.ae_title == "DERMGATE"
        assert settings.fhir is not None and settings.fhir.base_url is not None
        assert settings.dicom.allowed_callers and settings.dicom.destinations


def test_a_misspelt_top_level_key_in_a_settings_file_is_refused(tmp_path: Path,
                                                                  clean_env: pytest.MonkeyPatch) -> None:
    """The check above can fail: the settings model forbids unknown keys."""
    bad = tmp_path / "bad.toml"
    bad.write_text('databse_url = "sqlite:///x.db"\n', encoding="utf-8")
    clean_env.setenv("DERMGATE_CONFIG", str(bad))
    with pytest.raises(ValueError):
        Settings()


def test_a_misspelt_key_inside_a_section_is_refused(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    """A typo in [dicom] must stop the start, not silently leave the default in force."""
    bad = tmp_path / "bad.toml"
    bad.write_text('[dicom]\nae_titel = "DERMGATE"\n', encoding="utf-8")
    clean_env.setenv("DERMGATE_CONFIG", str(bad))
    with pytest.raises(ValueError):
        Settings()
