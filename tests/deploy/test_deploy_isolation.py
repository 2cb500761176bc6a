"""Failure isolation in the Kubernetes manifests: the EHR's key lives only where the EHR is used."""

from __future__ import annotations

from dermgate.settings import Settings
from tests.deploy.test_deploy_artefacts import K8S, all_containers, deployment, yaml_docs

FHIR_KEY_ITEM = "fhir-private-key.pem"


def _roles(component: str) -> set[str]:
    (c,) = deployment(component)["spec"]["template"]["spec"]["containers"]
    return set(c["args"][c["args"].index("--roles") + 1].split(","))


def _volumes_with_fhir_key(component: str) -> set[str]:
    spec = deployment(component)["spec"]["template"]["spec"]
    return {v["name"] for v in spec["volumes"]
            if any(i["key"] == FHIR_KEY_ITEM for i in v.get("secret", {}).get("items", []))}


def _fhir_key_path() -> str:
    (cm,) = [d for d in yaml_docs(K8S / "configmap.yaml") if d["kind"] == "ConfigMap"]
    import tomllib
    cfg = Settings.model_validate({**tomllib.loads(cm["data"]["dermgate.toml"]), "workdir": "/var/lib/dermgate"})
    assert cfg.fhir is not None and cfg.fhir.private_key_file is not None
    return str(cfg.fhir.private_key_file.parent)


def test_the_scp_pods_hold_no_ehr_key() -> None:
    """SCP pods run no dispatcher: they must not carry the SMART client key (nor need the EHR)."""
    assert "dispatcher" not in _roles("scp")
    assert _volumes_with_fhir_key("scp") == set()
    for c in all_containers(deployment("scp")):
        assert all(not m["mountPath"].startswith(_fhir_key_path()) for m in c["volumeMounts"]), c["name"]


def test_only_the_dispatcher_container_mounts_the_ehr_key() -> None:
    assert "dispatcher" in _roles("worker")
    (volume,) = _volumes_with_fhir_key("worker")
    spec = deployment("worker")["spec"]["template"]["spec"]
    holders = [c["name"] for c in all_containers(deployment("worker"))
               if any(m["name"] == volume for m in c["volumeMounts"])]
    assert holders == [spec["containers"][0]["name"]]       # not the migrate init container
    (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == volume]
    assert mount["mountPath"] == _fhir_key_path() and mount["readOnly"] is True
