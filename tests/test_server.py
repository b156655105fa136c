"""The product as a user meets it: `vllm-kvc serve` (vLLM's own OpenAI server + the plugin), live, on loopback."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    fh = open(log, "w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "vllm-kvc"), "serve", "--config",
                             "configs/default.yaml", "--port", str(port)], cwd=ROOT, env=env, stdout=fh,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError("server exited:\n" + log.read_text()[-5000:])
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        time.sleep(2)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("server not healthy in 600 s:\n" + log.read_text()[-5000:])
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    fh.close()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server + "/v1", api_key="unused")


def test_chat_completion(client):
    # a question SmolLM2-135M answers with a clear margin (dense bf16: 2.6 nats between its first two tokens; "the
    # capital of France?" is a near tie even for dense, 0.125 nats, and flips under any rounding)
    r = client.chat.completions.create(model="smollm2", temperature=0, max_tokens=24,
                                       messages=[{"role": "user", "content": "What is the capital of Japan?"}])
    text = r.choices[0].message.content
    assert "Tokyo" in text, text
    assert r.usage.completion_tokens > 0


def test_streamed_completion_equals_non_streamed(client):
    kw = dict(model="smollm2", prompt="The three primary colors are", temperature=0, max_tokens=32)
    full = client.completions.create(**kw).choices[0].text
    parts = [c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices]
    assert len(parts) > 3
    assert "".join(parts) == full
    assert len(full) > 10


def test_kv_compression_route(server):
    d = requests.get(server + "/v1/kv_compression", timeout=10).json()
    assert d["enabled"] and d["method"] == "lowrank"
    # configs/default.yaml: roped keys, K int8 / V int4 with one fp16 scale per 32 values, full rank
    assert d["latent_dtype"] == "int8/int4@g32" and d["group_size"] == 3
    assert len(d["layers"]) == 30
    assert all(l["rank_k"] == 192 and l["rank_v"] == 192 for l in d["layers"])
    assert d["kv_bytes_per_token"] == 30 * (192 + 96 + 2 * 12)
    assert d["kv_bytes_per_token_baseline"] == 30 * 2 * 3 * 64 * 2
    # vLLM's own capacity: the whole 1 GiB over the true bytes per token, in whole blocks
    assert d["kv_capacity_tokens"] == (1 << 30) // (d["block_size"] * d["kv_bytes_per_token"]) * d["block_size"]
    assert d["kv_capacity_tokens_baseline"] < d["kv_capacity_tokens"] / 2.3
    assert d["compression_ratio"] > 2.4
    assert requests.post(server + "/v1/kv_compression", timeout=10).status_code == 405


def test_bad_request_gets_error_json_and_server_keeps_serving(server, client):
    r = requests.post(server + "/v1/completions", json={"model": "smollm2", "prompt": "hi", "max_tokens": -5},
                      timeout=30)
    assert r.status_code == 400
    body = r.json()
    assert "max_tokens" in json.dumps(body)
    r = requests.post(server + "/v1/completions", json={"model": "nope", "prompt": "hi"}, timeout=30)
    assert r.status_code == 404 and "nope" in r.text
    ok = client.completions.create(model="smollm2", prompt="Hello", max_tokens=4, temperature=0)
    assert ok.choices[0].text


def test_metrics_exported_with_sane_values(server, client):
    from prometheus_client.parser import text_string_to_metric_families

    client.completions.create(model="smollm2", prompt="Count: one, two,", max_tokens=8, temperature=0)
    text = requests.get(server + "/metrics", timeout=10).text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {}
    for f in fams.values():
        for s in f.samples:
            samples.setdefault(s.name, []).append(s)
    val = lambda n: samples[n][0].value
    assert val("vllm_kvc_kv_cache_bytes_per_token") == 30 * 312
    assert val("vllm_kvc_kv_cache_baseline_bytes_per_token") == 23040
    assert 2.4 < val("vllm_kvc_compression_ratio") < 2.5
    assert val("vllm_kvc_kv_capacity_tokens") > 2.4 * val("vllm_kvc_kv_capacity_baseline_tokens")
    ranks = {(s.labels["layer"], s.labels["kind"]): s.value for s in samples["vllm_kvc_layer_rank"]}
    assert len(ranks) == 60 and ranks[("0", "k")] == 192 and ranks[("29", "v")] == 192
    info = samples["vllm_kvc_deployment_info"][0]
    assert info.value == 1 and info.labels["method"] == "lowrank" and info.labels["latent_dtype"] == "int8/int4@g32"
    assert info.labels["model_name"] == "smollm2"
    assert val("vllm_kvc_latent_cache_used_bytes") >= 0
    for name in samples:
        if name.startswith("vllm_kvc_"):
            assert all(s.labels.get("model_name") == "smollm2" for s in samples[name])
    from promql_names import missing_from_exposition
    assert not missing_from_exposition(text)


def test_plain_vllm_server_with_plugin_flags(model_dir, tmp_path):
    """The same plugin through vLLM's own entry point and flags only (what `vllm serve` users type), behind an API
    key: the plugin's route is guarded exactly like vLLM's own /v1 routes; /metrics and /health stay open."""
    port = _free_port()
    key = {"Authorization": "Bearer kvc-test-key"}
    comp = {"ratio": 0.5, "ratio_v": 1.0, "group_size": 3, "latent_dtype": "int8"}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
           "--served-model-name", "smol", "--port", str(port), "--enforce-eager", "--max-model-len", "2048",
           "--additional-config", json.dumps({"kv_compression": comp}),
           "--middleware", "vllm_kvc.server.app.kv_compression_middleware", "--api-key", "kvc-test-key"]
    log = tmp_path / "vllm.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1"), stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.time() + 600
            while time.time() < deadline:
                assert proc.poll() is None, log.read_text()[-5000:]
                try:
                    if requests.get(url + "/health", timeout=2).status_code == 200:
                        break
                except requests.ConnectionError:
                    time.sleep(2)
            for path in ("/v1/kv_compression", "/v1/models"):  # the route is guarded like vLLM's own
                assert requests.get(url + path, timeout=10).status_code == 401, path
                bad = {"Authorization": "Bearer wrong"}
                assert requests.get(url + path, headers=bad, timeout=10).status_code == 401, path
            d = requests.get(url + "/v1/kv_compression", headers=key, timeout=10).json()
            assert d["enabled"] and d["settings"]["ratio"] == 0.5 and d["model"] == "smol"
            assert d["layers"][0]["rank_k"] == 96 and d["layers"][0]["rank_v"] == 192
            r = requests.post(url + "/v1/completions", json={"model": "smol", "prompt": "The capital of France is",
                                                             "max_tokens": 8, "temperature": 0}, headers=key,
                              timeout=60)
            assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["text"]
            cap = (1 << 30) // (d["block_size"] * 30 * (96 + 192 + 4)) * d["block_size"]
            assert d["kv_capacity_tokens"] == cap
            assert f"CPU KV cache size: {cap:,} tokens" in log.read_text()
            m = requests.get(url + "/metrics", timeout=10)
            assert m.status_code == 200 and "vllm_kvc_compression_ratio" in m.text and "vllm:" in m.text
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)


def test_prometheus_scrapes_the_live_server_and_answers_queries(server, client, tmp_path):
    """A real Prometheus server (Debian's, run on loopback) scrapes /metrics and answers the dashboard's queries."""
    import shutil

    prom = shutil.which("prometheus")
    if prom is None:
        pytest.fail("prometheus binary missing: `make test` installs it via scripts/setup_tools.sh")
    target = server.split("//")[1]
    (tmp_path / "prom.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "rule_files: [%s]\n"
        "scrape_configs:\n  - job_name: vllm-kvc\n    static_configs: [{targets: ['%s']}]\n"
        % (ROOT / "deploy" / "prometheus" / "alerts.yml", target))
    port = _free_port()
    proc = subprocess.Popen([prom, f"--config.file={tmp_path / 'prom.yml'}", f"--storage.tsdb.path={tmp_path / 'db'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        client.completions.create(model="smollm2", prompt="Hello there", max_tokens=8, temperature=0)
        api = f"http://127.0.0.1:{port}/api/v1/query"
        deadline = time.time() + 60
        result = []
        while time.time() < deadline and not result:
            time.sleep(1)
            try:
                result = requests.get(api, params={"query": "vllm_kvc_compression_ratio"}, timeout=5) \
                    .json()["data"]["result"]
            except (requests.ConnectionError, KeyError):
                result = []
        assert result, "Prometheus never scraped vllm_kvc_compression_ratio"
        assert 2.4 < float(result[0]["value"][1]) < 2.5
        assert result[0]["metric"]["job"] == "vllm-kvc"
        q = 'sum by (kind) (vllm_kvc_layer_rank{model_name="smollm2"})'
        by_kind = {r["metric"]["kind"]: float(r["value"][1])
                   for r in requests.get(api, params={"query": q}, timeout=5).json()["data"]["result"]}
        assert by_kind == {"k": 30 * 192.0, "v": 30 * 192.0}
        rules = requests.get(f"http://127.0.0.1:{port}/api/v1/rules", timeout=5).json()["data"]["groups"]
        assert sum(len(g["rules"]) for g in rules) >= 5
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def test_thousand_requests_with_malformed_ones(server):
    """1,000 requests, 5% of them malformed in every way a client gets wrong: each bad one gets a 4xx OpenAI
    error JSON, no good one fails, and the server keeps serving (fault-injection figures in RESULTS.md)."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    url = server + "/v1/completions"
    bad_kinds = [
        ("not json", {"data": b"{\"model\": \"smollm2\", \"prompt\": ", "headers": {"content-type": "application/json"}}),
        ("no prompt", {"json": {"model": "smollm2", "max_tokens": 2}}),
        ("unknown model", {"json": {"model": "nope", "prompt": "hi", "max_tokens": 2}}),
        ("negative max_tokens", {"json": {"model": "smollm2", "prompt": "hi", "max_tokens": -1}}),
        ("wrong type", {"json": {"model": "smollm2", "prompt": "hi", "max_tokens": "two"}}),
        ("temperature out of range", {"json": {"model": "smollm2", "prompt": "hi", "temperature": -3}}),
        ("prompt too long", {"json": {"model": "smollm2", "prompt": "word " * 9000, "max_tokens": 2}}),
        ("unknown field type", {"json": {"model": "smollm2", "prompt": "hi", "logprobs": "many"}}),
    ]
    rng = random.Random(0)
    plan = ["good"] * 950 + [bad_kinds[i % len(bad_kinds)][0] for i in range(50)]
    rng.shuffle(plan)
    kinds = dict(bad_kinds)

    def one(kind):
        if kind == "good":
            r = requests.post(url, json={"model": "smollm2", "prompt": f"Count: {rng.randint(1, 99)},",
                                         "max_tokens": 2, "temperature": 0}, timeout=300)
            return kind, r.status_code, r.text
        r = requests.post(url, timeout=300, **kinds[kind])
        return kind, r.status_code, r.text

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, plan))
    good = [r for r in results if r[0] == "good"]
    bad = [r for r in results if r[0] != "good"]
    assert all(code == 200 for _, code, _ in good), [r for r in good if r[1] != 200][:3]
    for kind, code, text in bad:
        assert 400 <= code < 500, (kind, code, text[:300])
        body = json.loads(text)
        err = body.get("error", body)
        assert isinstance(err, dict) and (err.get("message") or err.get("detail") or body.get("detail")), \
            (kind, text[:300])
    assert requests.get(server + "/health", timeout=10).status_code == 200
    ok = requests.post(url, json={"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 4,
                                  "temperature": 0}, timeout=60)
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"]
    print(f"\n1,000 requests: {len(bad)} malformed -> {sum(400 <= c < 500 for _, c, _ in bad)} 4xx; "
          f"{len(good)} good -> {sum(c == 200 for _, c, _ in good)} 200")
