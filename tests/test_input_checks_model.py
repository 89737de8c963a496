"""Bad input to the model, its config and the training run gives a clear error naming the parameter."""

import json

import pytest
import torch
from safetensors.torch import save_file

import glm4moe_lib.train as tr
from glm4moe_lib.model import GLMMoEModel, ModelConfig
from glm4moe_lib.train import TrainConfig, load_checkpoint, model_from_checkpoint, train_preset

SMALL = dict(
    hidden_size=32,
    num_hidden_layers=2,
    intermediate_size=48,
    moe_intermediate_size=16,
    max_position_embeddings=16,
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> GLMMoEModel:
    torch.manual_seed(0)
    return GLMMoEModel(ModelConfig(**SMALL))


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))


# ---- 1. input_ids outside the vocabulary ----------------------------------------------------------


@pytest.mark.parametrize("bad", [256, 1000, -1])
def test_input_ids_out_of_vocab(model, ids, bad):
    x = ids.clone()
    x[1, 3] = bad
    with pytest.raises(ValueError, match=rf"input_ids contains {bad}: .*\[0, vocab_size=256\)"):
        model(x)


def test_train_config_vocab_smaller_than_tokenizer():
    with pytest.raises(ValueError, match=r"vocab_size=100 .*>= 256"):
        TrainConfig(model_overrides={"vocab_size": 100})
    assert TrainConfig(model_overrides={"vocab_size": 300}).model_config().vocab_size == 300


# ---- 2. labels -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda x: x.reshape(4, 4), r"labels has shape \(4, 4\).*input_ids' shape \(2, 8\)"),
        (lambda x: x.reshape(-1), r"labels has shape \(16,\).*input_ids' shape \(2, 8\)"),
        (lambda x: x.int(), r"labels has shape \(2, 8\) and dtype torch.int32: expected an int64"),
        (lambda x: x.float(), r"labels .*dtype torch.float32"),
        (lambda x: x.tolist(), r"labels .*dtype list"),
    ],
)
def test_labels_shape_and_dtype(model, ids, make, match):
    with pytest.raises(ValueError, match=match):
        model(ids, labels=make(ids))


@pytest.mark.parametrize("bad", [256, -1, -101])
def test_labels_out_of_vocab(model, ids, bad):
    y = ids.clone()
    y[0, 5] = bad
    with pytest.raises(ValueError, match=rf"labels contains {bad}: .*\[0, vocab_size=256\) or -100"):
        model(ids, labels=y)


def test_valid_labels_and_ignore_index(model, ids):
    full = model(ids, labels=ids).loss
    assert torch.isfinite(full)
    y = ids.clone()
    y[:, :4] = -100  # ignored positions: the loss is the mean over the others
    masked = model(ids, labels=y).loss
    logits = model(ids).logits
    expected = torch.nn.functional.cross_entropy(logits[:, 4:].reshape(-1, 256), ids[:, 4:].reshape(-1))
    torch.testing.assert_close(masked, expected)


# ---- 3. generate ---------------------------------------------------------------------------------


def test_generate_empty_prompt(model, ids):
    with pytest.raises(ValueError, match=r"input_ids has shape \(2, 0\): a prompt needs at least one token"):
        model.generate(ids[:, :0], 3)
    with pytest.raises(ValueError, match=r"input_ids contains 999"):
        model.generate(torch.tensor([[1, 999]]), 3)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(max_new_tokens=-1), r"max_new_tokens=-1 .*integer >= 0"),
        (dict(max_new_tokens=2.0), r"max_new_tokens=2.0"),
        (dict(max_new_tokens=3, temperature="hot"), r"temperature='hot'"),
        (dict(max_new_tokens=3, top_k=0), r"top_k=0"),
    ],
)
def test_generate_bad_arguments(model, ids, kw, match):
    with pytest.raises(ValueError, match=match):
        model.generate(ids, **kw)


def test_generate_valid(model, ids):
    out = model.generate(ids[:, :1], 3, temperature=0)
    assert out.shape == (2, 4) and torch.equal(out[:, :1], ids[:, :1])


# ---- 4. ModelConfig fields -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("rms_norm_eps", -1.0),
        ("rms_norm_eps", 0.0),
        ("rms_norm_eps", float("nan")),
        ("rms_norm_eps", "1e-6"),
        ("initializer_range", -1),
        ("initializer_range", float("nan")),
        ("initializer_range", float("inf")),
        ("rope_theta", "1e4"),
        ("rope_theta", float("inf")),
        ("rope_theta", True),
        ("partial_rotary_factor", "0.5"),
        ("partial_rotary_factor", float("nan")),
        ("tie_word_embeddings", "no"),
        ("tie_word_embeddings", 0),
        ("attention_bias", "yes"),
        ("use_qk_norm", 1),
    ],
)
def test_bad_model_config_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field}=.* is not allowed"):
        ModelConfig(**{**SMALL, field: value})


def test_valid_model_config_fields():
    cfg = ModelConfig(
        **SMALL, rms_norm_eps=1e-5, initializer_range=1, rope_theta=500000, tie_word_embeddings=False
    )
    model = GLMMoEModel(cfg)
    assert model.lm_head.weight is not model.embed_tokens.weight
    tied = GLMMoEModel(ModelConfig(**SMALL))
    assert tied.lm_head.weight is tied.embed_tokens.weight


# ---- 5. training run and checkpoints -------------------------------------------------------------


def test_out_dir_is_a_file_fails_before_training(tmp_path, monkeypatch):
    target = tmp_path / "results.txt"
    target.write_text("keep me")

    def no_training(*args, **kwargs):
        raise AssertionError("training started although out_dir is a file")

    monkeypatch.setattr(tr, "build_model", no_training)
    monkeypatch.setattr(tr, "load_corpus", no_training)
    cfg = train_preset("tiny", steps=1, progress=False, out_dir=str(target))
    with pytest.raises(ValueError, match=r"out_dir=.*results\.txt.* existing file"):
        tr.train(cfg)
    with pytest.raises(ValueError, match=r"out_dir=.*results\.txt.* is a file"):
        tr.train(cfg.replace(out_dir=str(target / "sub")))
    assert target.read_text() == "keep me"


def _write_checkpoint(path, model_cfg: ModelConfig, weights: dict[str, torch.Tensor], **meta_changes):
    """A hand-made checkpoint: the given weights plus the metadata save_checkpoint writes."""
    tensors = {f"model.{k}": v.contiguous().clone() for k, v in weights.items()}
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.loader"] = torch.Generator().get_state()
    meta = {
        "format": "glm4moe_lib.train/1",
        "step": "1",
        "train_config": json.dumps({}),
        "model_config": json.dumps(model_cfg.to_dict()),
        "optim_param_groups": "[]",
        "scheduler": "{}",
        "metrics": "{}",
    }
    meta.update(meta_changes)
    save_file(tensors, str(path), metadata={k: v for k, v in meta.items() if v is not None})
    return path


def test_checkpoint_with_format_but_no_metadata(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={"format": "glm4moe_lib.train/1"})
    with pytest.raises(ValueError, match=r"checkpoint=.*ckpt\.safetensors.* incomplete.*model_config"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match=r"checkpoint=.*incomplete"):
        model_from_checkpoint(path)


def test_checkpoint_missing_one_entry_or_unparsable(tmp_path, model):
    path = _write_checkpoint(tmp_path / "a.safetensors", model.config, model.state_dict(), scheduler=None)
    with pytest.raises(ValueError, match=r"checkpoint=.*incomplete: it lacks metadata \['scheduler'\]"):
        load_checkpoint(path)
    path = _write_checkpoint(tmp_path / "b.safetensors", model.config, model.state_dict(), metrics="{oops")
    with pytest.raises(ValueError, match=r"checkpoint=.*metadata 'metrics' does not parse"):
        load_checkpoint(path)


def test_model_from_checkpoint_with_mismatched_weights(tmp_path, model):
    other = ModelConfig(**{**SMALL, "hidden_size": 64})
    path = _write_checkpoint(tmp_path / "ckpt.safetensors", other, model.state_dict())
    with pytest.raises(
        ValueError, match=r"checkpoint=.*ckpt\.safetensors.* do not match its stored model config"
    ):
        model_from_checkpoint(path)
    bad_cfg = _write_checkpoint(
        tmp_path / "bad.safetensors", model.config, model.state_dict(), model_config='{"hidden_sise": 3}'
    )
    with pytest.raises(ValueError, match=r"checkpoint=.*model config that is not valid.*hidden_sise"):
        model_from_checkpoint(bad_cfg)


def test_model_from_checkpoint_valid(tmp_path, model, ids):
    path = _write_checkpoint(tmp_path / "ok.safetensors", model.config, model.state_dict())
    loaded = model_from_checkpoint(path)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


# ---- 6. empty input, building blocks, rotary sizes -----------------------------------------------


def test_forward_on_empty_input_is_a_clear_error(model, ids):
    with pytest.raises(ValueError, match=r"input_ids has shape \(2, 0\): it needs at least one token"):
        model(ids[:, :0], labels=ids[:, :0])
    with pytest.raises(ValueError, match=r"input_ids has shape \(2, 0\)"):
        model(ids[:, :0])
    with pytest.raises(ValueError, match=r"input_ids has shape \(0, 8\): the loss needs at least one row"):
        model(ids[:0], labels=ids[:0])
    assert model(ids[:0]).logits.shape == (0, 8, 256)  # no rows, no loss: fine


def test_building_blocks_check_their_arguments():
    from glm4moe_lib.model import Attention, DecoderLayer, RMSNorm, RotaryEmbedding, apply_rotary_pos_emb

    cfg = ModelConfig(**SMALL)
    for bad in (-1, 0, 4.0, True):
        with pytest.raises(ValueError, match=rf"hidden_size={bad!r} is not allowed"):
            RMSNorm(bad)
    for eps in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match=r"eps=.* is not allowed: it must be a finite number > 0"):
            RMSNorm(4, eps=eps)
    with pytest.raises(
        ValueError, match=r"hidden_states has shape \(2, 5\): expected \[\.\.\., H\] with H = hidden_size=4"
    ):
        RMSNorm(4)(torch.zeros(2, 5))
    for cls in (Attention, RotaryEmbedding):
        with pytest.raises(TypeError, match=r"config of type dict is not allowed: it must be a ModelConfig"):
            cls({})
    with pytest.raises(TypeError, match=r"config of type dict"):
        DecoderLayer({}, 0)
    attn = Attention(cfg)
    with pytest.raises(
        ValueError,
        match=r"hidden_states has shape \(1, 3, 16\): expected \[B, S, H\] with H = hidden_size=32",
    ):
        attn(torch.zeros(1, 3, 16))
    with pytest.raises(ValueError, match=r"hidden_states has shape \(3, 32\): expected \[B, S, H\]"):
        attn(torch.zeros(3, 32))
    for idx in (1.0, True, -1):
        with pytest.raises(ValueError, match=rf"layer_idx={idx!r} is not allowed"):
            DecoderLayer(cfg, idx)
    with pytest.raises(ValueError, match=r"layer_idx=1.0"):
        Attention(cfg, 1.0)
    with pytest.raises(ValueError, match=r"hidden_states has shape \(1, 3, 16\)"):
        DecoderLayer(cfg, 1)(torch.zeros(1, 3, 16))
    q = torch.zeros(1, 1, 3, 16)
    with pytest.raises(ValueError, match=r"cos \(5, 8\) and sin \(5, 8\) do not fit q \(1, 1, 3, 16\)"):
        apply_rotary_pos_emb(q, q, torch.zeros(5, 8), torch.zeros(5, 8))


@pytest.mark.parametrize("head_dim, factor", [(None, 0.3), (16, 0.3), (8, 0.6)])
def test_partial_rotary_factor_must_give_whole_dimensions(head_dim, factor):
    with pytest.raises(
        ValueError, match=rf"partial_rotary_factor={factor} is not allowed .*must be a positive even integer"
    ):
        ModelConfig(**SMALL, head_dim=head_dim, partial_rotary_factor=factor)


def test_partial_rotary_factor_that_gives_whole_dimensions():
    assert ModelConfig(**SMALL, head_dim=5, partial_rotary_factor=0.4).rotary_dim == 2
    assert ModelConfig(**SMALL, head_dim=10, partial_rotary_factor=0.4).rotary_dim == 4
    assert ModelConfig(**SMALL).rotary_dim == 4  # head_dim 8, factor 0.5
