"""Plans of methods lexico and pod: bytes per token, validation with named fields (no vLLM, no model)."""
import pytest

from vllm_kvc.config import CompressionConfig, ConfigError, parse_compression
from vllm_kvc.plan import ModelShape
from vllm_kvc.methods import build_plan
from vllm_kvc.methods.pod import default_groups as pod_default_groups

SMOL = ModelShape("LlamaForCausalLM", 30, 576, 9, 3, 64)
LLAMA8B = ModelShape("LlamaForCausalLM", 32, 4096, 32, 8, 128)


def test_lexico_bytes_per_token():
    p = build_plan(CompressionConfig(method="lexico", lexico={"sparsity_k": 6, "sparsity_v": 10}), SMOL)
    assert p.layer_bytes_per_token(0) == 3 * (6 + 10) * 4
    assert p.bytes_per_token() == 30 * 3 * 16 * 4
    assert p.bytes_per_token() / p.baseline_bytes_per_token() == pytest.approx(16 / 64)
    # tensor parallel: each rank holds its own KV heads' codes (the dictionaries are shared per layer)
    p8 = build_plan(CompressionConfig(method="lexico"), LLAMA8B, tp_size=4)
    assert p8.layer_bytes_per_token(0, tp_size=4) == 2 * 16 * 4


def test_pod_bytes_and_groups():
    cfg = CompressionConfig(method="pod", pod={"followers": 20, "max_group": 3})
    p = build_plan(cfg, SMOL)
    groups = [list(g) for g in p.groups]
    assert sum(len(g) - 1 for g in groups) == 20 and max(len(g) for g in groups) <= 3
    assert [i for g in groups for i in g] == list(range(30))
    assert p.bytes_per_token() == (10 * 2 + 20) * 3 * 64 * 2
    explicit = [[0, 1, 2]] + [[i] for i in range(3, 30)]
    p2 = build_plan(CompressionConfig(method="pod", pod={"groups": explicit, "max_group": 3}), SMOL)
    assert [list(g) for g in p2.groups] == explicit and p2.reported_ranks()[0][:3] == [64, 0, 0]
    assert pod_default_groups(5, 2, 2) == [[0], [1, 2], [3, 4]]


@pytest.mark.parametrize("comp, field", [
    ({"method": "lexico", "lexico": {"sparsity_k": 65}}, "compression.lexico.sparsity_k"),
    ({"method": "lexico", "lexico": {"atoms": 16, "sparsity_v": 32}}, "compression.lexico.atoms"),
    ({"method": "pod", "pod": {"followers": 16, "max_group": 2}}, "compression.pod.followers"),
    ({"method": "pod", "pod": {"groups": [[0, 2]] + [[i] for i in range(3, 30)]}}, "compression.pod.groups"),
    ({"method": "pod", "pod": {"groups": [[0, 1, 2]] + [[i] for i in range(3, 30)], "max_group": 2}},
     "compression.pod.groups"),
])
def test_bad_method_settings_name_the_field(comp, field):
    with pytest.raises(ConfigError) as e:
        build_plan(parse_compression(comp), SMOL)
    assert e.value.field == field


@pytest.mark.parametrize("comp, field", [
    ({"method": "sparse"}, "compression.method"),
    ({"method": "pod", "pod": {"window": -1}}, "compression.pod.window"),
    ({"method": "lexico", "lexico": {"atoms": 70000}}, "compression.lexico.atoms"),
    ({"method": "lexico", "lexico": {"dictionary": 3}}, "compression.lexico.dictionary"),
])
def test_bad_method_settings_rejected_by_schema(comp, field):
    with pytest.raises(ConfigError) as e:
        parse_compression(comp)
    assert e.value.field == field


def test_prepare_without_building_reads_only_what_is_cached(tmp_path, monkeypatch):
    from vllm_kvc.methods import prepare

    monkeypatch.setenv("VLLM_KVC_CACHE", str(tmp_path))
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text('{"num_hidden_layers": 30}')
    cfg = CompressionConfig(method="pod", pod={"followers": 10})
    plan, path = prepare(str(model), cfg, SMOL, build=False)  # nothing measured yet: placeholder groups
    assert path is None and plan.bytes_per_token() == build_plan(cfg, SMOL).bytes_per_token()
    lex, lpath = prepare(str(model), CompressionConfig(method="lexico"), SMOL, build=False)
    assert lpath is None and lex.method == "lexico"
