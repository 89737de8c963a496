"""MoEConfig: validation with clear messages, presets, and conversion to/from transformers."""

import pytest
from transformers import Glm4MoeConfig

from glm4moe_lib import ARCHS, PRESETS, MoE, MoEConfig, preset


@pytest.mark.parametrize(
    ("changes", "field", "allowed"),
    [
        ({"hidden_size": 0}, "hidden_size=0", "positive integer"),
        ({"moe_intermediate_size": -3}, "moe_intermediate_size=-3", "positive integer"),
        ({"n_routed_experts": 2.5}, "n_routed_experts=2.5", "positive integer"),
        ({"num_experts_per_tok": 0}, "num_experts_per_tok=0", "positive integer"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok=9", "at most"),
        ({"n_shared_experts": -1}, "n_shared_experts=-1", ">= 0"),
        ({"n_group": 3}, "n_group=3", "divide n_routed_experts"),
        ({"n_group": 8}, "n_group=8", "at least 2 experts"),
        ({"n_group": 2, "topk_group": 3}, "topk_group=3", "between 1 and n_group=2"),
        (
            {"n_group": 4, "topk_group": 1, "num_experts_per_tok": 3},
            "num_experts_per_tok=3",
            "at most topk_group * n_routed_experts / n_group = 2",
        ),
        ({"scoring_func": "relu"}, "scoring_func='relu'", "'softmax', 'sigmoid'"),
        ({"hidden_act": "tanh"}, "hidden_act='tanh'", "silu"),
        ({"routed_scaling_factor": 0.0}, "routed_scaling_factor=0.0", "> 0"),
        ({"routed_scaling_factor": float("nan")}, "routed_scaling_factor=nan", "> 0"),
        ({"norm_topk_prob": "yes"}, "norm_topk_prob='yes'", "True or False"),
        ({"dispatch": "magic"}, "dispatch='magic'", "auto"),
    ],
)
def test_bad_values_name_field_value_and_rule(changes, field, allowed):
    with pytest.raises(ValueError) as err:
        MoEConfig(**changes)
    assert field in str(err.value)
    assert allowed in str(err.value)


def test_replace_validates_again():
    cfg = MoEConfig()
    with pytest.raises(ValueError, match="num_experts_per_tok=100"):
        cfg.replace(num_experts_per_tok=100)
    assert cfg.replace(num_experts_per_tok=4).num_experts_per_tok == 4


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid_and_copied(name):
    cfg = preset(name)
    assert cfg == PRESETS[name]
    assert cfg is not PRESETS[name]


def test_unknown_preset():
    with pytest.raises(ValueError, match="preset='glm5' is not known"):
        preset("glm5")


def test_real_glm45_sizes():
    # zai-org/GLM-4.5 and GLM-4.5-Air config.json (see shared/reference.md)
    assert (PRESETS["glm4.5"].n_routed_experts, PRESETS["glm4.5"].routed_scaling_factor) == (160, 2.5)
    assert (PRESETS["glm4.5-air"].n_routed_experts, PRESETS["glm4.5-air"].hidden_size) == (128, 4096)
    assert ARCHS["glm4.5"].num_hidden_layers == 92 and ARCHS["glm4.5"].first_k_dense_replace == 3
    assert ARCHS["glm4.5-air"].num_hidden_layers == 46 and ARCHS["glm4.5-air"].first_k_dense_replace == 1


def test_from_hf_and_to_hf_round_trip():
    hf = Glm4MoeConfig(
        hidden_size=48,
        moe_intermediate_size=24,
        n_routed_experts=12,
        num_experts_per_tok=3,
        n_shared_experts=2,
        n_group=3,
        topk_group=2,
        norm_topk_prob=False,
        routed_scaling_factor=1.5,
    )
    cfg = MoEConfig.from_hf(hf)
    assert cfg.scoring_func == "sigmoid"
    assert (cfg.hidden_size, cfg.n_group, cfg.topk_group, cfg.norm_topk_prob) == (48, 3, 2, False)
    # a mapping of the same fields (its to_dict(), a config.json) gives the same config, not the defaults
    from_dict = MoEConfig.from_hf(hf.to_dict())
    assert from_dict == cfg
    assert from_dict != MoEConfig()
    assert MoEConfig.from_hf(hf.to_dict(), dispatch="loop").dispatch == "loop"
    back = cfg.to_hf()
    for name in (
        "hidden_size",
        "moe_intermediate_size",
        "n_routed_experts",
        "n_group",
        "routed_scaling_factor",
    ):
        assert getattr(back, name) == getattr(hf, name)


def test_to_hf_refuses_softmax():
    with pytest.raises(ValueError, match="scoring_func='softmax'"):
        MoEConfig(scoring_func="softmax").to_hf()


@pytest.mark.parametrize("name", ["tiny", "small", "mixtral-like"])
def test_parameter_count_matches_module(name):
    cfg = preset(name)
    counts = cfg.num_parameters()
    assert counts["total"] == sum(p.numel() for p in MoE(cfg).parameters())
    k, e = cfg.num_experts_per_tok, cfg.n_routed_experts
    assert counts["total"] - counts["active"] == (e - k) * counts["per_expert"]
