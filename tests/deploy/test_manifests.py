"""Offline checks of the Kubernetes manifests in deploy/k8s (no cluster needed).

Every document is validated against the Kubernetes OpenAPI schemas (strict: unknown fields fail), as
written in base/ and as rendered by `kubectl kustomize` for base and each overlay. Then the rendered
objects are cross-checked the way a cluster would only tell us at run time: commands parse with the
project's own CLI, config and secret keys exist, Services and probes name real ports, volumes and claims
exist, the model servers drain within their grace period, GPUs only in the gpu overlay, and the
NetworkPolicies allow exactly the intended paths.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
# The oldest Kubernetes we support (native gRPC probes are GA since 1.27) and the newest schema shipped
# with kubernetes-validate: a field removed or added between them fails one of the two.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
RENDERS = ("base", "overlays/gpu", "overlays/cpu-dev")
MODEL_SERVERS = {"vit": 50051, "vae": 50052, "llm": 50053}
BAGEL_PROCESSES = (*MODEL_SERVERS, "worker", "gateway")
PENDING_SUBCOMMANDS = {"worker", "gateway"}  # the lead is adding these to services.cli
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job")
NAME = "app.kubernetes.io/name"
S3_ENV = {"BAGEL_S3_ENDPOINT", "BAGEL_S3_ACCESS_KEY", "BAGEL_S3_SECRET_KEY", "BAGEL_S3_BUCKET"}
REQUIRED_ENV = {
    "vit": S3_ENV, "vae": S3_ENV,
    "llm": S3_ENV | {"BAGEL_KV_CACHE_TOKENS", "BAGEL_MAX_BATCH_TOKENS", "BAGEL_SESSION_TTL_SECONDS",
                     "BAGEL_MAX_SESSIONS", "BAGEL_ATTENTION_BACKEND"},
    "worker": S3_ENV | {"BAGEL_REDIS_URL", "BAGEL_VIT_ADDR", "BAGEL_VAE_ADDR", "BAGEL_LLM_ADDR", "BAGEL_AUTH_TOKEN"},
    "gateway": S3_ENV | {"BAGEL_REDIS_URL", "BAGEL_AUTH_TOKEN"},
    "minio-bucket": S3_ENV,
}


# ---- loading and validating ------------------------------------------------------------------------
def load_docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


@functools.cache
def rendered(name: str) -> tuple[dict, ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH, so the kustomizations cannot be rendered")
    out = subprocess.run([kubectl, "kustomize", str(K8S / name)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {name} failed:\n{out.stderr}"
    return tuple(load_docs(out.stdout))


def ident(doc: dict) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def validate(doc: dict) -> None:
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{ident(doc)} is invalid for Kubernetes {version}: {e.message} at {list(e.path)}")


@pytest.fixture(params=RENDERS)
def render(request) -> str:
    return request.param


@pytest.fixture()
def docs(render) -> tuple[dict, ...]:
    return rendered(render)


# ---- object helpers ----------------------------------------------------------------------------------
def of_kind(docs, *kinds) -> list[dict]:
    return [d for d in docs if d["kind"] in kinds]


def get(docs, kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def workloads(docs) -> list[dict]:
    return of_kind(docs, *WORKLOAD_KINDS)


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def pod_labels(workload: dict) -> dict:
    return workload["spec"]["template"]["metadata"].get("labels", {})


def workload(docs, name: str) -> dict:
    """The workload whose pods are labelled app.kubernetes.io/name=`name`."""
    found = [w for w in workloads(docs) if pod_labels(w).get(NAME) == name]
    assert len(found) == 1, f"expected one workload with pods named {name}, found {[ident(w) for w in found]}"
    return found[0]


def containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec["containers"]


def main_container(docs, name: str) -> dict:
    return pod_spec(workload(docs, name))["containers"][0]


def all_containers(docs):
    for w in workloads(docs):
        for c in containers(pod_spec(w)):
            yield w, c


def ports(container: dict) -> dict[str, int]:
    return {p.get("name", str(p["containerPort"])): p["containerPort"] for p in container.get("ports", [])}


def names_port(container: dict, port) -> bool:
    known = ports(container)
    return port in known.values() if isinstance(port, int) else port in known


def argv(container: dict) -> list[str]:
    return [str(a) for a in container.get("command", []) + container.get("args", [])]


def flag(container: dict, name: str, default=None):
    args = argv(container)
    return args[args.index(name) + 1] if name in args else default


def selects(selector: dict, labels: dict) -> bool:
    """Kubernetes label-selector semantics (a Service's plain map is matchLabels)."""
    match = selector.get("matchLabels", selector if "matchExpressions" not in selector else {})
    if any(labels.get(k) != v for k, v in match.items()):
        return False
    for e in selector.get("matchExpressions", []):
        key, op, values = e["key"], e["operator"], e.get("values", [])
        ok = {"In": labels.get(key) in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def env_of(docs, container: dict) -> dict:
    """name -> value (literal or from a ConfigMap) or ("secret", name, key)."""
    env = {}
    for ref in container.get("envFrom", []):
        if "configMapRef" in ref:
            env.update(get(docs, "ConfigMap", ref["configMapRef"]["name"]).get("data", {}))
    for e in container.get("env", []):
        src = e.get("valueFrom", {})
        if "secretKeyRef" in src:
            env[e["name"]] = ("secret", src["secretKeyRef"]["name"], src["secretKeyRef"]["key"])
        elif "configMapKeyRef" in src:
            ref = src["configMapKeyRef"]
            env[e["name"]] = get(docs, "ConfigMap", ref["name"])["data"][ref["key"]]
        else:
            env[e["name"]] = e.get("value", "")
    return env


def mount_for(spec: dict, container: dict, path: str) -> tuple[dict, dict] | None:
    """(volumeMount, volume) of the deepest mount that holds `path`."""
    hits = [m for m in container.get("volumeMounts", [])
            if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")]
    if not hits:
        return None
    mount = max(hits, key=lambda m: len(m["mountPath"]))
    volume = next((v for v in spec.get("volumes", []) if v["name"] == mount["name"]), {"name": mount["name"]})
    return mount, volume


def quantity(q) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "m": 1e-3}
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(q))
    return float(m.group(1)) * units.get(m.group(2), 1)


# ---- schema validation -------------------------------------------------------------------------------
BASE_FILES = sorted(p for p in (K8S / "base").glob("*.yaml") if p.name != "kustomization.yaml")


def test_strict_validation_rejects_unknown_fields():
    doc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
           "spec": {"ports": [{"port": 80, "targetPrt": 8080}]}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[0], strict=True)


@pytest.mark.parametrize("path", BASE_FILES, ids=lambda p: p.name)
def test_base_documents_validate(path):
    docs = load_docs(path.read_text())
    assert docs, f"{path.name} holds no document"
    for doc in docs:
        validate(doc)


def test_rendered_documents_validate(docs):
    for doc in docs:
        validate(doc)
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "bagel", f"{ident(doc)} is not in namespace bagel"


# ---- commands ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BAGEL_PROCESSES)
def test_commands_parse_with_the_cli(docs, name):
    from services.cli import build_parser

    container = main_container(docs, name)
    assert container["command"] == ["bagel-serve"], f"{name} does not run the bagel-serve entry point"
    parser, args = build_parser(), argv(container)[1:]
    with contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            parsed = parser.parse_args(args)
        except SystemExit:
            parsed = None
    if parsed is None:
        known = next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        if args[0] in PENDING_SUBCOMMANDS and args[0] not in known:
            pytest.skip(f"services.cli.build_parser() has no `{args[0]}` subcommand yet (being added)")
        pytest.fail(f"`bagel-serve {' '.join(args)}` does not parse: {err.getvalue()}")
    if name in MODEL_SERVERS:
        assert (parsed.command, parsed.service) == ("serve", name)
        assert parsed.port == MODEL_SERVERS[name] == ports(container)["grpc"]
        assert parsed.metrics_port == ports(container)["metrics"]


@pytest.mark.parametrize("name", BAGEL_PROCESSES)
def test_every_bagel_process_binds_all_interfaces_explicitly(docs, name):
    # The CLI binds 127.0.0.1 unless told otherwise: a pod must say so, or its Service, probes and
    # metrics scrapes could not reach it.
    from services.cli import build_parser

    container = main_container(docs, name)
    assert flag(container, "--host") == "0.0.0.0", f"{name} does not pass --host 0.0.0.0: {argv(container)}"
    assert build_parser().parse_args(argv(container)[1:]).host == "0.0.0.0"


def test_the_cli_binds_loopback_by_default():
    from services.cli import build_parser

    for args in (["serve", "vit"], ["gateway"], ["worker"]):
        assert build_parser().parse_args(args).host == "127.0.0.1", args


def test_exec_probes_do_not_rely_on_kubernetes_variable_expansion(docs):
    # Kubernetes expands $(VAR) in command/args only; inside a probe's `sh -c` it is command substitution.
    for w, c in all_containers(docs):
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            command = " ".join(c.get(probe, {}).get("exec", {}).get("command", []))
            assert not re.search(r"\$\([A-Za-z_]+\)", command), f"{ident(w)} {probe}: {command}"


def test_worker_liveness_pings_its_own_celery_node(docs):
    command = main_container(docs, "worker")["livenessProbe"]["exec"]["command"]
    assert command[:2] == ["sh", "-c"]
    assert "celery -A services.orchestrator.celery_app:app inspect ping" in command[2]
    assert re.search(r'-d "?celery@\$\{?HOSTNAME\}?"?', command[2])


# ---- configuration -----------------------------------------------------------------------------------
def test_config_and_secret_references_exist(docs):
    keys = {(d["kind"], d["metadata"]["name"]): set(d.get("data", {})) | set(d.get("stringData", {}))
            for d in of_kind(docs, "ConfigMap", "Secret")}

    def check(kind, name, key, where):
        assert (kind, name) in keys, f"{where}: {kind} {name} is not defined"
        assert key is None or key in keys[(kind, name)], f"{where}: {kind} {name} has no key {key}"

    for w, c in all_containers(docs):
        where = f"{ident(w)} container {c['name']}"
        for ref in c.get("envFrom", []):
            kind, r = ("ConfigMap", ref["configMapRef"]) if "configMapRef" in ref else ("Secret", ref["secretRef"])
            check(kind, r["name"], None, where)
        for e in c.get("env", []):
            for kind, field in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                if ref := e.get("valueFrom", {}).get(field):
                    check(kind, ref["name"], ref["key"], f"{where} env {e['name']}")
        for v in pod_spec(w).get("volumes", []):
            for kind, field, name_field in (("ConfigMap", "configMap", "name"), ("Secret", "secret", "secretName")):
                if src := v.get(field):
                    for item in src.get("items") or [{"key": None}]:
                        check(kind, src[name_field], item["key"], f"{ident(w)} volume {v['name']}")


def test_the_secret_is_a_template(render):
    secret = get(rendered(render), "Secret", "bagel-secrets")
    values = {**secret.get("stringData", {}), **secret.get("data", {})}
    assert values and all(v.startswith("REPLACE-ME") for v in values.values()), "real values in the template?"
    # and every bagel-serve process refuses to start with one of them
    from services.common.secrets import WeakSecret, check_secret

    for key, value in values.items():
        with pytest.raises(WeakSecret):
            check_secret(value, key)


def test_processes_get_their_environment(docs):
    for name, required in REQUIRED_ENV.items():
        env = env_of(docs, main_container(docs, name))
        assert required <= env.keys(), f"{name} lacks {sorted(required - env.keys())}"
    # the worker presents the token the model servers check; clients get a different one
    worker_token = env_of(docs, main_container(docs, "worker"))["BAGEL_AUTH_TOKEN"]
    for name in MODEL_SERVERS:
        spec, c = pod_spec(workload(docs, name)), main_container(docs, name)
        token_file = flag(c, "--auth-token-file")
        assert token_file, f"{name} does not require a token"
        _, volume = mount_for(spec, c, token_file) or pytest.fail(f"{name}: {token_file} is not mounted")
        item = next(i for i in volume["secret"]["items"] if token_file.endswith("/" + i["path"]))
        assert ("secret", volume["secret"]["secretName"], item["key"]) == worker_token, name
    assert env_of(docs, main_container(docs, "gateway"))["BAGEL_AUTH_TOKEN"] != worker_token
    # MinIO's root credentials are the ones the clients use
    minio, client = env_of(docs, main_container(docs, "minio")), env_of(docs, main_container(docs, "worker"))
    assert (minio["MINIO_ROOT_USER"], minio["MINIO_ROOT_PASSWORD"]) == \
           (client["BAGEL_S3_ACCESS_KEY"], client["BAGEL_S3_SECRET_KEY"])


def test_service_addresses_point_at_services(docs):
    env = env_of(docs, main_container(docs, "worker"))
    addresses = {f"//{env[f'BAGEL_{n.upper()}_ADDR']}": n for n in MODEL_SERVERS}
    addresses.update({env["BAGEL_REDIS_URL"]: "redis", env["BAGEL_S3_ENDPOINT"]: "minio"})
    for address, target in addresses.items():
        url = urlsplit(address)
        service = get(docs, "Service", url.hostname)
        assert url.port in [p["port"] for p in service["spec"]["ports"]], f"{address}: no such port"
        assert selects(service["spec"]["selector"], pod_labels(workload(docs, target))), address


# ---- services, probes, volumes -----------------------------------------------------------------------
def test_services_select_one_workload_and_target_its_ports(docs):
    for svc in of_kind(docs, "Service"):
        targets = [w for w in workloads(docs) if selects(svc["spec"]["selector"], pod_labels(w))]
        assert len(targets) == 1, f"{ident(svc)} selects {[ident(w) for w in targets]}"
        for p in svc["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            assert any(names_port(c, target) for c in containers(pod_spec(targets[0]))), \
                f"{ident(svc)}: no container port {target}"
    assert get(docs, "Service", "llm")["spec"].get("sessionAffinity") == "ClientIP"


def test_probes_name_container_ports(docs):
    for w, c in all_containers(docs):
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            for handler in ("httpGet", "tcpSocket", "grpc"):
                if port := c.get(probe, {}).get(handler, {}).get("port"):
                    assert names_port(c, port), f"{ident(w)} {probe} uses port {port}, not a container port"


def test_volumes_claims_and_service_accounts_exist(docs):
    claims = {d["metadata"]["name"] for d in of_kind(docs, "PersistentVolumeClaim")}
    accounts = {d["metadata"]["name"]: d for d in of_kind(docs, "ServiceAccount")}
    for w in workloads(docs):
        spec = pod_spec(w)
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        templates = {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
        for c in containers(spec):
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes.keys() | templates, f"{ident(w)} mounts undefined volume {m['name']}"
        for v in volumes.values():
            if pvc := v.get("persistentVolumeClaim"):
                assert pvc["claimName"] in claims, f"{ident(w)} uses undefined claim {pvc['claimName']}"
        sa = accounts.get(spec.get("serviceAccountName"))
        assert sa is not None, f"{ident(w)} uses an undefined ServiceAccount"
        assert sa.get("automountServiceAccountToken") is False, f"{ident(w)} gets an API token"


def test_pods_are_locked_down_and_sized(docs):
    user = re.search(r"^USER\s+(\d+)", (ROOT / "deploy/docker/Dockerfile").read_text(), re.MULTILINE).group(1)
    for w, c in all_containers(docs):
        spec, where = pod_spec(w), f"{ident(w)} container {c['name']}"
        pod_sc, sc = spec.get("securityContext", {}), c.get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True and pod_sc.get("runAsUser", 0) > 0, where
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        assert sc.get("allowPrivilegeEscalation") is False, where
        assert sc.get("readOnlyRootFilesystem") is True, where
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
        assert (mount_for(spec, c, "/tmp") or [None, {}])[1].get("emptyDir") is not None, f"{where}: no /tmp"
        res = c.get("resources", {})
        assert {"cpu", "memory"} <= res.get("requests", {}).keys() and "memory" in res.get("limits", {}), where
        assert quantity(res["requests"]["memory"]) <= quantity(res["limits"]["memory"]), where
        if c["image"].startswith("bagel-serve"):
            assert str(pod_sc["runAsUser"]) == user, f"{where}: runs as {pod_sc['runAsUser']}, the image's is {user}"
        if pod_labels(w)[NAME] in BAGEL_PROCESSES:
            for var in ("BAGEL_SERVE_CACHE", "TRITON_CACHE_DIR", "HOME"):
                path = env_of(docs, c).get(var)
                assert path and mount_for(spec, c, path), f"{where}: {var}={path} is on the read-only root"


def test_images_are_pinned_and_one_image_runs_everything(render, docs):
    images = {c["image"] for _, c in all_containers(docs)}
    assert all(re.search(r":[\w.-]+$", i) and not i.endswith(":latest") for i in images), images
    expected = "bagel-serve:0.1.0-cuda" if render == "overlays/gpu" else "bagel-serve:0.1.0"
    assert {i for i in images if i.startswith("bagel-serve")} == {expected}


# ---- the model servers, Redis, budgets -------------------------------------------------------------
def test_model_servers_drain_within_grace_and_start_patiently(docs):
    for name, port in MODEL_SERVERS.items():
        spec, c = pod_spec(workload(docs, name)), main_container(docs, name)
        drain = float(flag(c, "--grace-seconds", 20)) + float(flag(c, "--drain-seconds", 5))
        assert spec.get("terminationGracePeriodSeconds", 30) > drain, f"{name}: SIGKILL before the drain ends"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == port, f"{name} {probe} is not a gRPC health check on {port}"
        startup = c["startupProbe"]
        assert startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3) >= 600, name


def test_metrics_ports_are_annotated_for_prometheus(docs):
    for name in (*MODEL_SERVERS, "gateway"):
        annotations = workload(docs, name)["spec"]["template"]["metadata"].get("annotations", {})
        c = main_container(docs, name)
        assert annotations.get("prometheus.io/scrape") == "true", name
        assert int(annotations["prometheus.io/port"]) == ports(c)["metrics"] == int(flag(c, "--metrics-port")), name


def test_redis_persists_to_a_claim(docs):
    redis = workload(docs, "redis")
    c = pod_spec(redis)["containers"][0]
    assert flag(c, "--appendonly") == "yes" and flag(c, "--maxmemory-policy") == "noeviction"
    # Records and queued messages must never be evicted silently: a full Redis refuses writes instead,
    # which needs a maxmemory (docs/orchestrator.md, "Redis must never evict").
    assert flag(c, "--maxmemory") not in (None, "0")
    data = next(m for m in c["volumeMounts"] if m["mountPath"] == flag(c, "--dir"))
    assert redis["kind"] == "StatefulSet" and data["name"] in {t["metadata"]["name"]
                                                               for t in redis["spec"]["volumeClaimTemplates"]}


def test_disruption_budgets_cover_gateway_and_worker(docs):
    covered = set()
    for pdb in of_kind(docs, "PodDisruptionBudget"):
        targets = [pod_labels(w)[NAME] for w in workloads(docs) if selects(pdb["spec"]["selector"], pod_labels(w))]
        assert len(targets) == 1, f"{ident(pdb)} selects {targets}"
        covered.add(targets[0])
    assert {"gateway", "worker"} <= covered


# ---- overlays ----------------------------------------------------------------------------------------
def gpus(container: dict) -> tuple:
    res = container.get("resources", {})
    return res.get("requests", {}).get("nvidia.com/gpu"), res.get("limits", {}).get("nvidia.com/gpu")


def test_gpu_overlay_gives_each_model_server_a_gpu_and_the_checkpoint():
    docs = rendered("overlays/gpu")
    for w, c in all_containers(docs):
        name = pod_labels(w)[NAME]
        if name not in MODEL_SERVERS:
            assert gpus(c) == (None, None), f"{name} should not take a GPU"
            continue
        spec = pod_spec(w)
        assert tuple(map(str, gpus(c))) == ("1", "1"), name
        assert any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", [])), name
        assert (flag(c, "--device"), flag(c, "--dtype")) == ("cuda", "bfloat16"), name
        checkpoint = flag(c, "--checkpoint")
        assert checkpoint == "/models/BAGEL-7B-MoT", name
        mount, volume = mount_for(spec, c, checkpoint) or pytest.fail(f"{name}: {checkpoint} is not mounted")
        assert mount.get("readOnly") is True and volume["persistentVolumeClaim"]["claimName"] == "bagel-models"
    for hpa in of_kind(docs, "HorizontalPodAutoscaler"):
        target = get(docs, hpa["spec"]["scaleTargetRef"]["kind"], hpa["spec"]["scaleTargetRef"]["name"])
        assert "replicas" not in target["spec"], f"{ident(target)} fixes replicas under an HPA"
        assert all("cpu" in c["resources"]["requests"] for c in containers(pod_spec(target)))
    assert {h["spec"]["scaleTargetRef"]["name"] for h in of_kind(docs, "HorizontalPodAutoscaler")} == \
           {"worker", "gateway"}


def test_cpu_dev_overlay_is_cpu_only_single_replica_and_small():
    docs = rendered("overlays/cpu-dev")
    for w, c in all_containers(docs):
        assert gpus(c) == (None, None) and not pod_spec(w).get("tolerations"), ident(w)
        assert quantity(c["resources"]["limits"]["memory"]) <= quantity("4Gi"), ident(w)
        if w["kind"] != "Job":
            assert w["spec"].get("replicas") == 1, ident(w)
    for name in MODEL_SERVERS:
        spec, c = pod_spec(workload(docs, name)), main_container(docs, name)
        assert (flag(c, "--device"), flag(c, "--dtype"), flag(c, "--checkpoint")) == ("cpu", "float32", None)
        cache = env_of(docs, c)["BAGEL_SERVE_CACHE"]  # where the embedded tiny model is created
        assert "emptyDir" in (mount_for(spec, c, cache) or pytest.fail(f"{name}: {cache} is not mounted"))[1]
    assert not of_kind(docs, "HorizontalPodAutoscaler")


# ---- network policy ----------------------------------------------------------------------------------
def allows(docs, source: dict | None, target: str, port: str, namespace: str = "bagel") -> bool:
    """Does ingress to pod `target` on its named `port` admit `source` (pod labels, or None for a
    non-pod client) from `namespace`? Standard NetworkPolicy semantics: a pod selected by no Ingress
    policy admits everything; otherwise any rule of any selecting policy must match peer and port."""
    w = workload(docs, target)
    labels, container = pod_labels(w), pod_spec(w)["containers"][0]
    number = ports(container)[port]
    policies = [p for p in of_kind(docs, "NetworkPolicy")
                if "Ingress" in p["spec"].get("policyTypes", ["Ingress"]) and selects(p["spec"]["podSelector"], labels)]
    if not policies:
        return True

    def peer_ok(peer):
        if "ipBlock" in peer:
            return source is None
        ns_ok = selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": namespace}) \
            if "namespaceSelector" in peer else namespace == "bagel"
        return ns_ok and ("podSelector" not in peer or (source is not None and selects(peer["podSelector"], source)))

    def port_ok(p):
        if p.get("port") in (None, port, number):
            return True
        return isinstance(p["port"], int) and "endPort" in p and p["port"] <= number <= p["endPort"]

    return any((not rule.get("from") or any(peer_ok(peer) for peer in rule["from"]))
               and (not rule.get("ports") or any(port_ok(p) for p in rule["ports"]))
               for p in policies for rule in p["spec"].get("ingress", []))


ALLOWED = [("worker", s, "grpc") for s in MODEL_SERVERS] + [(s, "redis", "redis") for s in ("gateway", "worker")] \
    + [(s, "minio", "api") for s in ("gateway", "worker", *MODEL_SERVERS, "minio-bucket")]
DENIED = [("gateway", s, "grpc") for s in MODEL_SERVERS] + [("vit", "llm", "grpc"), ("llm", "vit", "grpc"),
          ("minio-bucket", "llm", "grpc"), ("vit", "redis", "redis"), ("minio", "redis", "redis"),
          ("redis", "minio", "api"), ("worker", "gateway", "metrics")]


def test_network_policy_allows_only_the_intended_paths(docs):
    pod = {name: pod_labels(workload(docs, name)) for name in {n for path in ALLOWED + DENIED for n in path[:2]}}
    for source, target, port in ALLOWED:
        assert allows(docs, pod[source], target, port), f"{source} cannot reach {target}:{port}"
    for source, target, port in DENIED:
        assert not allows(docs, pod[source], target, port), f"{source} can reach {target}:{port}"
    # clients outside the namespace reach the gateway only; Prometheus reaches the metrics ports
    assert allows(docs, None, "gateway", "http", "ingress-nginx") and allows(docs, None, "gateway", "grpc", "x")
    assert not allows(docs, None, "llm", "grpc", "x") and not allows(docs, {NAME: "worker"}, "llm", "grpc", "x")
    for name in (*MODEL_SERVERS, "gateway"):
        assert allows(docs, {}, name, "metrics", "monitoring"), f"Prometheus cannot scrape {name}"
