"""The GLM-4-style decoder: shapes, layer placement, causality, references, bad configs."""

import pytest
import torch

from glm4moe_lib import MoE
from glm4moe_lib.experts import MLP
from glm4moe_lib.model import (
    MODEL_PRESETS,
    DecoderLayer,
    GLMMoEModel,
    ModelConfig,
    RMSNorm,
    apply_rotary_pos_emb,
    model_preset,
)
from glm4moe_lib.router import RouterOutput

pytestmark = pytest.mark.usefixtures("one_thread")


SMALL = dict(
    hidden_size=32,
    num_hidden_layers=3,
    intermediate_size=48,
    moe_intermediate_size=16,
    max_position_embeddings=32,
)


def _model(device, **kw) -> GLMMoEModel:
    torch.manual_seed(0)
    return GLMMoEModel(ModelConfig(**{**SMALL, **kw})).to(device)


def test_shapes_and_routing(device):
    model = _model(device)
    x = torch.randint(0, 256, (2, 16), device=device)
    out = model(x, labels=x, return_routing=True)
    assert out.logits.shape == (2, 16, 256) and out.logits.dtype == torch.float32
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert len(out.routing) == 3 and out.routing[0] is None
    for r in out.routing[1:]:
        assert isinstance(r, RouterOutput)
        assert r.topk_indices.shape == (32, 2) and r.logits.shape == (32, 8)
    assert model(x).routing is None and model(x).loss is None


@pytest.mark.parametrize("k", [0, 1, 3])
def test_dense_and_moe_layer_placement(k):
    model = _model("cpu", first_k_dense_replace=k)
    kinds = [type(layer.mlp) for layer in model.layers]
    assert kinds == [MLP] * k + [MoE] * (3 - k)
    assert len(model.moe_layers()) == 3 - k
    names = dict(model.named_modules())
    for i in range(3):
        for sub in ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp"):
            assert f"layers.{i}.{sub}" in names
    if k < 3:
        assert "layers.2.mlp.gate.e_score_correction_bias" in model.state_dict()


def test_future_tokens_do_not_change_past_logits(device):
    model = _model(device).eval()
    x = torch.randint(0, 256, (1, 20), device=device)
    y = x.clone()
    y[0, 12:] = torch.randint(0, 256, (8,), device=device)
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_tied_and_untied_embeddings():
    tied = _model("cpu", tie_word_embeddings=True)
    untied = _model("cpu", tie_word_embeddings=False)
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert untied.lm_head.weight is not untied.embed_tokens.weight
    n_t, n_u = tied.num_parameters()["total"], untied.num_parameters()["total"]
    assert n_u - n_t == 256 * 32


def test_rmsnorm_and_rotary_match_transformers():
    from transformers.models.glm4_moe import modeling_glm4_moe as hf

    torch.manual_seed(0)
    x = torch.randn(3, 5, 16)
    ours, ref = RMSNorm(16, eps=1e-6), hf.Glm4MoeRMSNorm(16, eps=1e-6)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ref.weight.copy_(ours.weight)
    torch.testing.assert_close(ours(x), ref(x))
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)
    cfg = ModelConfig(**SMALL, head_dim=8, partial_rotary_factor=0.5)
    from glm4moe_lib.model import RotaryEmbedding

    cos, sin = RotaryEmbedding(cfg)(5, torch.device("cpu"), torch.float32)
    a = apply_rotary_pos_emb(q, k, cos, sin)
    b = hf.apply_rotary_pos_emb(q, k, cos[None], sin[None])
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])
    assert torch.equal(a[0][..., 4:], q[..., 4:])  # the unrotated half passes through


def test_decoder_layer_standalone_matches_in_model():
    model = _model("cpu").eval()
    layer = model.layers[1]
    assert isinstance(layer, DecoderLayer)
    h = torch.randn(2, 10, 32)
    with torch.no_grad():
        pos = model.rotary_emb(10, h.device, torch.float32)
        a, ra = layer(h, pos, return_routing=True)
        b, rb = layer(h, return_routing=True)  # builds its own rotary tables
    torch.testing.assert_close(a, b)
    assert torch.equal(ra.topk_indices, rb.topk_indices)


def test_generate_is_seeded():
    model = _model("cpu")
    x = torch.randint(0, 256, (1, 4))
    a = model.generate(x, 8, top_k=5, generator=torch.Generator().manual_seed(1))
    b = model.generate(x, 8, top_k=5, generator=torch.Generator().manual_seed(1))
    assert a.shape == (1, 12) and torch.equal(a, b)
    greedy = model.generate(x, 40, temperature=0)  # longer than the context: it crops
    assert greedy.shape == (1, 44)


def test_presets_and_dense_twin():
    for name in MODEL_PRESETS:
        cfg = model_preset(name)
        twin = cfg.dense_equivalent()
        assert twin.num_moe_layers == 0
        assert twin.intermediate_size == cfg.moe_intermediate_size * (
            cfg.num_experts_per_tok + cfg.n_shared_experts
        )
        assert cfg.intermediate_size == twin.intermediate_size  # presets: equal active FFN size
    m, d = GLMMoEModel(model_preset("tiny")), GLMMoEModel(model_preset("tiny").dense_equivalent())
    router = sum(moe.gate.weight.numel() for moe in m.moe_layers())
    assert m.num_parameters()["active"] - router == d.num_parameters()["active"]


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(first_k_dense_replace=4), r"first_k_dense_replace=4 .*between 0 and num_hidden_layers=3"),
        (dict(num_key_value_heads=3), r"num_key_value_heads=3 .*divide num_attention_heads=4"),
        (dict(hidden_size=30), r"num_attention_heads=4 .*divide hidden_size=30"),
        (dict(num_experts_per_tok=9), r"num_experts_per_tok=9"),
        (dict(vocab_size=0), r"vocab_size=0 .*integer >= 1"),
        (dict(partial_rotary_factor=0.0), r"partial_rotary_factor=0.0"),
    ],
)
def test_bad_config_is_a_clear_error(changes, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**{**SMALL, **changes})


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="preset='huge' is not known"):
        model_preset("huge")
    model = _model("cpu")
    with pytest.raises(ValueError, match="max_position_embeddings=32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[batch, seq\] int64"):
        model(torch.zeros(4))
    with pytest.raises(ValueError, match="layer_idx=5"):
        DecoderLayer(model.config, 5)
    with pytest.raises(ValueError, match="unknown field"):
        ModelConfig.from_dict({"hidden_sise": 3})
