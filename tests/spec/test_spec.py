"""The spec (docs/design.md#the-spec): every spec rule, its defaults, YAML I/O and the bundled specs."""

import math

import pytest
import yaml
from pydantic import ValidationError

from ktgen.spec import (
    LoRASpec,
    MoESpec,
    QuantSpec,
    SpecError,
    bundled_spec_names,
    bundled_spec_path,
    load_spec,
)

BASE = dict(
    name="layer",
    expert_num=8,
    num_experts_per_tok=2,
    hidden_size=256,
    intermediate_size=512,
)

BUNDLED = {
    # name: (expert_num, num_experts_per_tok, hidden_size, intermediate_size, quant mode)
    "qwen3-30b-a3b": (128, 8, 2048, 768, "bf16"),
    "qwen3-235b-a22b": (128, 8, 4096, 1536, "bf16"),
    "deepseek-v2-lite": (64, 6, 2048, 1408, "bf16"),
    "deepseek-v3": (256, 8, 7168, 2048, "bf16"),
    "kimi-k2": (384, 8, 7168, 2048, "k2"),
    "mixtral-8x7b": (8, 2, 4096, 14336, "bf16"),
    "tiny": (8, 2, 128, 256, "bf16"),
}


def make(**changes):
    return MoESpec(**{**BASE, **changes})


def write(tmp_path, text, name="spec.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# --- defaults ------------------------------------------------------------------------


def test_defaults():
    spec = make()
    assert spec.max_len == 4096
    assert spec.quant == QuantSpec(mode="bf16", group_size=None)
    assert spec.lora == LoRASpec(rank=16, alpha=32.0, use_rslora=False, dtype="float32")
    assert spec.tp_count == 1
    assert spec.max_cache_depth == 2
    assert spec.isa == "auto"
    assert spec.threads is None


@pytest.mark.parametrize(
    "mode, group_size", [("bf16", None), ("int8", None), ("awq", 128), ("k2", 32)]
)
def test_default_group_size(mode, group_size):
    assert QuantSpec(mode=mode).group_size == group_size
    assert make(quant={"mode": mode}).quant.group_size == group_size


@pytest.mark.parametrize("rank", [1, 8, 16, 256])
def test_alpha_defaults_to_twice_rank(rank):
    assert LoRASpec(rank=rank).alpha == 2 * rank


def test_scale():
    assert LoRASpec(rank=16).scale == 2.0
    assert LoRASpec(rank=8, alpha=4).scale == 0.5
    assert LoRASpec(rank=16, alpha=8, use_rslora=True).scale == 2.0
    assert LoRASpec(rank=8, use_rslora=True).scale == pytest.approx(16 / math.sqrt(8))


def test_intermediate_per_partition():
    assert make(intermediate_size=512, tp_count=4).intermediate_per_partition == 128


def test_explicit_values_are_kept():
    spec = make(
        max_len=1,
        quant={"mode": "awq", "group_size": 64},
        lora={"rank": 4, "alpha": 1.5, "use_rslora": True, "dtype": "bfloat16"},
        tp_count=2,
        max_cache_depth=5,
        isa="avx512",
        threads=3,
    )
    assert spec.quant.group_size == 64
    assert spec.lora == LoRASpec(rank=4, alpha=1.5, use_rslora=True, dtype="bfloat16")
    assert (spec.tp_count, spec.max_cache_depth, spec.isa, spec.threads) == (2, 5, "avx512", 3)


# --- rules: each bad value names its field ----------------------------------------


BAD_VALUES = [
    ("name", {"name": "Layer"}),
    ("name", {"name": "1layer"}),
    ("name", {"name": "my-layer"}),
    ("name", {"name": ""}),
    ("expert_num", {"expert_num": 0}),
    ("num_experts_per_tok", {"num_experts_per_tok": 0}),
    ("num_experts_per_tok", {"num_experts_per_tok": 9}),
    ("hidden_size", {"hidden_size": 0}),
    ("hidden_size", {"hidden_size": 100}),
    ("hidden_size", {"hidden_size": -32}),
    ("intermediate_size", {"intermediate_size": 0}),
    ("intermediate_size", {"intermediate_size": 48}),
    ("intermediate_size", {"intermediate_size": 96, "tp_count": 2}),
    ("max_len", {"max_len": 0}),
    ("quant.mode", {"quant": {"mode": "fp8"}}),
    ("quant.group_size", {"quant": {"mode": "bf16", "group_size": 32}}),
    ("quant.group_size", {"quant": {"mode": "int8", "group_size": 32}}),
    ("quant.group_size", {"quant": {"mode": "awq", "group_size": 0}}),
    ("quant.group_size", {"quant": {"mode": "k2", "group_size": -32}}),
    ("quant.group_size", {"quant": {"mode": "awq", "group_size": 96}}),  # hidden 256
    ("quant.group_size", {"quant": {"mode": "k2", "group_size": 512}}),  # > hidden
    # divides hidden_size (256) but not intermediate_size / tp_count (512 / 4 = 128)
    ("quant.group_size", {"quant": {"mode": "awq", "group_size": 256}, "tp_count": 4}),
    ("lora.rank", {"lora": {"rank": 0}}),
    ("lora.rank", {"lora": {"rank": 257}}),
    ("lora.alpha", {"lora": {"alpha": 0}}),
    ("lora.alpha", {"lora": {"alpha": -1.0}}),
    ("lora.alpha", {"lora": {"alpha": float("nan")}}),
    ("lora.use_rslora", {"lora": {"use_rslora": "yes"}}),
    ("lora.dtype", {"lora": {"dtype": "float16"}}),
    ("tp_count", {"tp_count": 0}),
    ("max_cache_depth", {"max_cache_depth": 0}),
    ("isa", {"isa": "sse"}),
    ("threads", {"threads": 0}),
    ("expert_num", {"expert_num": True}),
    ("hidden_size", {"hidden_size": "256"}),
    ("hidden_size", {"hidden_size": 256.0}),
]


@pytest.mark.parametrize("field, changes", BAD_VALUES)
def test_bad_value_names_field(field, changes):
    with pytest.raises(SpecError) as excinfo:
        make(**changes)
    locs = [".".join(map(str, error["loc"])) for error in excinfo.value.errors()]
    assert field in locs
    assert field in str(excinfo.value)


@pytest.mark.parametrize("field, changes", BAD_VALUES)
def test_bad_value_in_yaml_names_field(tmp_path, field, changes):
    path = write(tmp_path, yaml.safe_dump({**BASE, **changes}))
    with pytest.raises(SpecError) as excinfo:
        load_spec(path)
    message = str(excinfo.value)
    assert f"field '{field}'" in message
    assert str(path) in message


@pytest.mark.parametrize(
    "field", ["name", "expert_num", "num_experts_per_tok", "hidden_size", "intermediate_size"]
)
def test_required_fields(field):
    data = {key: value for key, value in BASE.items() if key != field}
    with pytest.raises(SpecError, match=field):
        MoESpec(**data)


def test_constructor_raises_spec_error_naming_the_field():
    # ktgen.SpecError (a ValueError), not pydantic's raw ValidationError.
    with pytest.raises(SpecError) as excinfo:
        make(hidden_size=48)
    assert isinstance(excinfo.value, ValueError)
    assert not isinstance(excinfo.value, ValidationError)
    assert str(excinfo.value).startswith("field 'hidden_size': ")
    assert "(got 48)" in str(excinfo.value)
    with pytest.raises(SpecError, match="field 'rank'"):
        LoRASpec(rank=0)
    with pytest.raises(SpecError, match="field 'intermediate_size'"):
        MoESpec.model_validate({**BASE, "intermediate_size": 48})


def test_every_error_is_reported_one_per_line():
    text = yaml.safe_dump({**BASE, "expert_num": 0, "lora": {"rank": 0}, "isa": "x"})
    with pytest.raises(SpecError) as excinfo:
        MoESpec.from_yaml(text, source="many.yaml")
    lines = str(excinfo.value).splitlines()
    assert len(lines) == 3
    assert all(line.startswith("spec many.yaml: ") for line in lines)


def test_edge_values_are_valid():
    make(num_experts_per_tok=8)  # == expert_num
    make(expert_num=1, num_experts_per_tok=1, hidden_size=32, intermediate_size=32, max_len=1)
    make(lora={"rank": 256})
    make(quant={"mode": "awq", "group_size": 1})
    make(quant={"mode": "awq", "group_size": 128}, intermediate_size=512, tp_count=4)


def test_lora_null_means_no_lora(tmp_path):
    assert make(lora=None).lora is None
    spec = load_spec(write(tmp_path, yaml.safe_dump({**BASE}) + "lora: null\n"))
    assert spec.lora is None
    assert MoESpec.from_yaml(spec.to_yaml()) == spec


def test_frozen():
    spec = make()
    with pytest.raises(ValidationError):
        spec.hidden_size = 512
    with pytest.raises(ValidationError):
        spec.quant.mode = "int8"
    with pytest.raises(ValidationError):
        spec.lora.rank = 4
    assert hash(spec) == hash(make())


# --- replace --------------------------------------------------------------------------


def test_replace_revalidates():
    spec = make()
    assert spec.replace(tp_count=2).tp_count == 2
    assert spec.replace(tp_count=2).hidden_size == spec.hidden_size
    assert spec == make()  # the original is untouched
    with pytest.raises(SpecError, match="intermediate_size"):
        spec.replace(tp_count=3)
    with pytest.raises(SpecError, match="bogus"):
        spec.replace(bogus=1)


def test_replace_nested_dicts_recompute_defaults():
    spec = make()
    assert spec.replace(lora={"rank": 4}).lora == LoRASpec(rank=4, alpha=8.0)
    assert spec.replace(quant={"mode": "k2"}).quant == QuantSpec(mode="k2", group_size=32)
    assert spec.replace(quant=QuantSpec(mode="awq")).quant.group_size == 128
    assert spec.replace(lora=None).lora is None


# --- YAML -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        make(),
        make(lora=None),
        make(
            quant={"mode": "awq", "group_size": 64},
            lora={"rank": 3, "alpha": 0.5, "use_rslora": True},
        ),
        make(tp_count=2, threads=4, isa="avx2", max_cache_depth=3, lora={"dtype": "bfloat16"}),
    ],
)
def test_yaml_round_trip(spec):
    assert MoESpec.from_yaml(spec.to_yaml()) == spec


def test_to_yaml_spells_out_every_field():
    data = yaml.safe_load(make().to_yaml())
    assert list(data) == list(MoESpec.model_fields)
    assert data["quant"] == {"mode": "bf16", "group_size": None}
    assert data["lora"]["alpha"] == 32.0


def test_not_yaml(tmp_path):
    path = write(tmp_path, "name: [unclosed\nexpert_num: 8\n")
    with pytest.raises(SpecError, match="not valid YAML") as excinfo:
        load_spec(path)
    assert str(path) in str(excinfo.value)


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "just a string\n", "42\n", ""])
def test_not_a_mapping(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(SpecError, match="expected a mapping") as excinfo:
        load_spec(path)
    assert str(path) in str(excinfo.value)


@pytest.mark.parametrize(
    "extra, key",
    [
        ("hiden_size: 256\n", "hiden_size"),
        ("lora: {rnk: 4}\n", "lora.rnk"),
        ("quant: {mode: awq, group: 64}\n", "quant.group"),
    ],
)
def test_unknown_key(tmp_path, extra, key):
    path = write(tmp_path, yaml.safe_dump(BASE) + extra)
    with pytest.raises(SpecError) as excinfo:
        load_spec(path)
    message = str(excinfo.value)
    assert f"unknown key '{key}'" in message
    assert str(path) in message


def test_unknown_key_in_constructor():
    with pytest.raises(SpecError, match="lora.rnk"):
        make(lora={"rnk": 4})


def test_missing_file(tmp_path):
    with pytest.raises(SpecError, match="missing.yaml"):
        load_spec(tmp_path / "missing.yaml")


def test_from_yaml_default_source():
    with pytest.raises(SpecError, match="<string>"):
        MoESpec.from_yaml("- 1")


# --- bundled specs --------------------------------------------------------------------


def test_bundled_names():
    assert bundled_spec_names() == sorted(BUNDLED)


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_bundled_spec(name):
    spec = load_spec(name)
    expert_num, per_tok, hidden, intermediate, mode = BUNDLED[name]
    assert spec.name == name.replace("-", "_")
    assert (spec.expert_num, spec.num_experts_per_tok) == (expert_num, per_tok)
    assert (spec.hidden_size, spec.intermediate_size) == (hidden, intermediate)
    assert spec.quant.mode == mode
    assert spec.isa == "auto"
    if name == "tiny":
        assert (spec.max_len, spec.lora.rank) == (256, 8)
    else:
        assert (spec.max_len, spec.lora.rank) == (4096, 16)
    assert load_spec(bundled_spec_path(name)) == spec
    assert load_spec(str(bundled_spec_path(name))) == spec
    assert MoESpec.from_yaml(spec.to_yaml()) == spec


def test_bundled_specs_cite_their_model():
    for name in bundled_spec_names():
        assert bundled_spec_path(name).read_text().startswith("# ")


def test_kimi_k2_group_size():
    assert load_spec("kimi-k2").quant == QuantSpec(mode="k2", group_size=32)


def test_unknown_name_lists_bundled_names():
    with pytest.raises(SpecError) as excinfo:
        load_spec("qwen4")
    message = str(excinfo.value)
    assert "qwen4" in message
    assert all(name in message for name in BUNDLED)
    with pytest.raises(SpecError, match="tiny"):
        bundled_spec_path("nope")
