"""Input checks of glm4moe_lib.train and glm4moe_lib.data: clear errors naming the parameter."""

import hashlib
import json
import math

import pytest
import torch

from glm4moe_lib import train as tr
from glm4moe_lib.data import BatchLoader, ByteTokenizer, eval_batches, load_corpus, split_corpus
from glm4moe_lib.train import (
    TrainConfig,
    TrainingError,
    domain_expert_information,
    evaluate,
    specialization_matrix,
    train,
    train_preset,
)

FAST = dict(
    model_overrides=dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=16),
    batch_size=4,
    seq_len=16,
    eval_batches=1,
    warmup_steps=2,
    progress=False,
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus():
    return split_corpus({d: (d + " text, some bytes 0123456789. ") * 20 for d in ("a", "b")})


def _cfg(**kw) -> TrainConfig:
    return train_preset("tiny", **{**FAST, **kw})


# ---- 1. resume continues the saved run ------------------------------------------------------------


def test_resume_with_changed_fields_or_fewer_steps_is_a_clear_error(corpus, tmp_path):
    cfg = _cfg(steps=4, eval_interval=0, out_dir=str(tmp_path))
    train(cfg, corpus=corpus)
    with pytest.raises(ValueError, match=r"lr=0\.003 but the config has lr=0\.01.*min_lr.*same values"):
        train(cfg.replace(lr=1e-2, min_lr=1e-2, steps=6), corpus=corpus, resume=True)
    with pytest.raises(ValueError, match=r"steps=2 .*already at step 4"):
        train(cfg.replace(steps=2), corpus=corpus, resume=True)
    result = train(cfg.replace(steps=6, eval_interval=3), corpus=corpus, resume=True)
    assert result.config.steps == 6 and result.metrics["train_config"] == result.config.to_dict()
    assert [r["step"] for r in result.metrics["train"]] == [1, 2, 3, 4, 5, 6]


# ---- 2. specialization_matrix and evaluate ---------------------------------------------------------


@pytest.mark.parametrize(
    "idx, dom, d, e, exc, match",
    [
        ([[0, 5], [1, 2]], [0, 0], 2, 4, ValueError, r"topk_indices contains 5.*n_experts=4"),
        ([[0, -1], [1, 2]], [0, 0], 2, 4, ValueError, r"topk_indices contains -1"),
        ([[0, 1], [1, 2]], [0, 2], 2, 4, ValueError, r"domain_ids contains 2.*n_domains=2"),
        ([[0, 1], [1, 2]], [0, 1], 2, 0, ValueError, r"n_experts=0"),
        ([[0, 1], [1, 2]], [0, 1], True, 4, ValueError, r"n_domains=True"),
        ([[0.0, 1.0], [1.0, 2.0]], [0, 1], 2, 4, TypeError, r"topk_indices is a torch.float32"),
        ([0, 1], [0, 1], 2, 4, ValueError, r"topk_indices has shape \(2,\)"),
    ],
)
def test_specialization_matrix_checks(idx, dom, d, e, exc, match):
    with pytest.raises(exc, match=match):
        specialization_matrix(torch.tensor(idx), torch.tensor(dom), d, e)


def test_evaluate_checks_domains_and_batches(corpus):
    cfg = _cfg(steps=1)
    model = tr.build_model(cfg)
    batches = eval_batches(corpus.val, 4, 16, 1)
    with pytest.raises(ValueError, match=r"domains=\['a'\] .*domain ids up to 1"):
        evaluate(model, batches, corpus.domains[:1])
    with pytest.raises(ValueError, match=r"batches is empty"):
        evaluate(model, [], corpus.domains)


# ---- 3. domain_expert_information ------------------------------------------------------------------


def test_domain_expert_information_normalises_counts_and_checks_input():
    assert domain_expert_information(torch.tensor([[10.0, 0.0], [0.0, 10.0]])) == pytest.approx(1.0)
    assert domain_expert_information(torch.tensor([[0.5, 0.5], [0.5, 0.5]])) == pytest.approx(0.0)
    for bad, match in [
        (torch.tensor([[float("nan"), 1.0], [1.0, 0.0]]), "matrix contains NaN"),
        (torch.zeros(0, 4), r"matrix has shape \(0, 4\)"),
        (torch.ones(2, 2, 2), r"matrix has shape \(2, 2, 2\)"),
        (torch.tensor([[1.0, -1.0], [1.0, 0.0]]), r"matrix contains -1"),
        (torch.zeros(2, 3), "matrix sums to 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            domain_expert_information(bad)


# ---- 4. TrainConfig fields and step numbering ------------------------------------------------------


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        (dict(lr=math.inf), ValueError, r"lr=inf .*finite"),
        (dict(weight_decay=math.nan), ValueError, r"weight_decay=nan"),
        (dict(aux_loss_coef=True), TypeError, r"aux_loss_coef=True .*number"),
        (dict(weight_decay="0.1"), TypeError, r"weight_decay='0.1' .*number"),
        (dict(beta1=math.nan), ValueError, r"beta1=nan"),
        (dict(grad_clip=math.inf), ValueError, r"grad_clip=inf"),
        (dict(bias_update_rate="x"), TypeError, r"bias_update_rate='x'"),
        (dict(out_dir=5), TypeError, r"out_dir=5 .*str or os.PathLike"),
        (dict(data_dir=5), TypeError, r"data_dir=5"),
        (dict(dense=1), TypeError, r"dense=1"),
    ],
)
def test_bad_train_config_fields(kw, exc, match):
    with pytest.raises(exc, match=match):
        TrainConfig(**kw)


def test_failure_message_numbers_steps_consistently(corpus, monkeypatch):
    calls = {"n": 0}
    real = tr.GLMMoEModel.forward

    def nan_on_second_step(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if kwargs.get("labels") is not None:
            calls["n"] += 1
            if calls["n"] == 2:
                out = out._replace(loss=out.loss * float("nan"))
        return out

    monkeypatch.setattr(tr.GLMMoEModel, "forward", nan_on_second_step)
    with pytest.raises(TrainingError, match=r"failed at step 2 .*loss is nan at step 2\)"):
        train(_cfg(steps=3, eval_interval=0), corpus=corpus)


# ---- 5. command line -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args", [["--threads", "-1"], ["--threads", "0"], ["--steps", "0"], ["--samples", "-1"]]
)
def test_cli_rejects_non_positive_values(args, capsys):
    with pytest.raises(SystemExit) as exc:
        tr.main([*args, "--no-progress"])
    assert exc.value.code == 2
    assert args[0] in capsys.readouterr().err


# ---- 6. data ---------------------------------------------------------------------------------------


def test_loader_and_eval_batches_check_data(corpus):
    with pytest.raises(ValueError, match=r"data=\{\}"):
        BatchLoader({}, 2, 4)
    with pytest.raises(ValueError, match=r"data=\{\}"):
        eval_batches({}, 2, 4, 1)
    for n in (0, -1):
        with pytest.raises(ValueError, match=rf"n_batches={n}"):
            eval_batches(corpus.val, 2, 4, n)
    with pytest.raises(TypeError, match=r"data\['a'\] is a torch.float32"):
        BatchLoader({"a": torch.arange(50.0)}, 2, 4)
    with pytest.raises(TypeError, match=r"data\['a'\] .*shape \(5, 10\)"):
        BatchLoader({"a": torch.arange(50).view(5, 10)}, 2, 4)


def _write_corpus(root, raw=b"hello", manifest=None):
    root.mkdir(exist_ok=True)
    (root / "a.txt").write_bytes(raw)
    info = {"file": "a.txt", "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    manifest = manifest if manifest is not None else {"domains": ["a"], "files": {"a": info}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return info


def test_load_corpus_checks(tmp_path):
    with pytest.raises(TypeError, match=r"path=5"):
        load_corpus(5)
    root = tmp_path / "c"
    _write_corpus(root, manifest={"domains": ["a"], "files": {}})
    with pytest.raises(ValueError, match=r"manifest=.*manifest\.json.*files\['a'\]"):
        load_corpus(root)
    _write_corpus(root, manifest={"domains": ["a"], "files": {"a": {"bytes": 5, "sha256": "x"}}})
    with pytest.raises(ValueError, match=r"manifest=.*manifest\.json.*\['file'\]"):
        load_corpus(root)
    _write_corpus(root, raw=b"ok \xff\xfe bad")
    with pytest.raises(ValueError, match=r"a\.txt.*not valid UTF-8.*offset 3"):
        load_corpus(root)
    _write_corpus(root, raw=b"fine")
    assert load_corpus(root) == {"a": "fine"}


def test_tokenizer_checks():
    tok = ByteTokenizer()
    with pytest.raises(TypeError, match=r"ids contains 65.7"):
        tok.decode([65.7])
    with pytest.raises(TypeError, match=r"ids is a torch.float32"):
        tok.decode(torch.tensor([65.0]))
    with pytest.raises(TypeError, match=r"text=None"):
        tok.encode(None)
    with pytest.raises(TypeError, match=r"text=b'x' .*str"):
        tok.encode(b"x")
    with pytest.raises(ValueError, match=r"token_id=300 .*\[0, 256\)"):
        tok.token_str(300)
    with pytest.raises(TypeError, match=r"token_id=1.5"):
        tok.token_str(1.5)
    assert tok.decode(tok.encode("héllo")) == "héllo" and tok.token_str(10) == "⏎"


# ---- 7. a resumed checkpoint is checked before training starts -----------------------------------


@pytest.fixture(scope="module")
def saved_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("saved")
    train(_cfg(steps=3, eval_interval=0, out_dir=str(out)), corpus=corpus, stop_after=2)
    return tr.load_checkpoint(out / "checkpoint.safetensors")


def _tampered(saved_run, tmp_path, tensors=None, **meta):
    from safetensors.torch import save_file

    t, m = saved_run
    t = {**t, **(tensors or {})}
    path = tmp_path / "tampered.safetensors"
    save_file({k: v for k, v in t.items() if v is not None}, str(path), metadata={**m, **meta})
    return path


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(step="-3"), r"its step is -3, but a step count is an integer >= 0"),
        (dict(step="1"), r"its step is 1 but its metrics record 2 training steps"),
        (
            dict(tensors={"optim.3.exp_avg": None}),
            r"optimizer state of parameter 3 has \['exp_avg_sq', 'step'\]",
        ),
        (dict(tensors={"optim.99.exp_avg": torch.zeros(1)}), r"optimizer tensor 'optim.99.exp_avg'"),
        (dict(tensors={"optim.0.exp_avg": torch.zeros(3)}), r"optim.0.exp_avg is torch.float32 \(3,\)"),
        (
            dict(tensors={"rng.torch": torch.zeros(4, dtype=torch.uint8)}),
            r"its rng.torch is not a random generator state",
        ),
        (dict(tensors={"rng.loader": torch.zeros(4, dtype=torch.uint8)}), r"its rng.loader is not a random"),
        (dict(optim_param_groups="[]"), r"optimizer parameter groups do not fit this model's 2 groups"),
        (dict(scheduler='{"last_epoch": 7}'), r"scheduler state does not belong to step 2"),
        (dict(loader_calls="-1"), r"loader_calls='-1'"),
        (dict(metrics='{"train": 3}'), r"its metrics lack the 'train' and 'eval' lists"),
    ],
)
def test_resume_from_a_tampered_checkpoint_is_a_clear_error(
    corpus, saved_run, tmp_path, monkeypatch, change, match
):
    path = _tampered(saved_run, tmp_path, **change)

    def no_training(*args, **kwargs):
        raise AssertionError("training started from a corrupt checkpoint")

    monkeypatch.setattr(tr.BatchLoader, "next", no_training)
    with pytest.raises(ValueError, match=rf"resume=.*tampered\.safetensors' is corrupt: .*{match}"):
        train(_cfg(steps=3, eval_interval=0), corpus=corpus, resume=path)


def test_resume_weights_of_another_dtype_is_a_clear_error(corpus, saved_run, tmp_path):
    name = next(k for k in saved_run[0] if k.endswith("gate.weight"))
    path = _tampered(saved_run, tmp_path, tensors={name: saved_run[0][name].double()})
    with pytest.raises(ValueError, match=r"is corrupt: its weight .*gate.weight' is torch.float64"):
        train(_cfg(steps=3, eval_interval=0), corpus=corpus, resume=path)


def test_resume_argument_and_checkpoint_path_checks(corpus, tmp_path):
    with pytest.raises(ValueError, match=r"checkpoint=.* is a directory, not a checkpoint file"):
        tr.load_checkpoint(tmp_path)
    with pytest.raises(ValueError, match=r"is a directory, not a checkpoint file"):
        train(_cfg(steps=1), corpus=corpus, resume=str(tmp_path))
    with pytest.raises(TypeError, match=r"resume=5 is not allowed: .*path .*True"):
        train(_cfg(steps=1), corpus=corpus, resume=5)
    with pytest.raises(ValueError, match=r"resume='' is not allowed"):
        train(_cfg(steps=1), corpus=corpus, resume="")


# ---- 8. more argument checks ---------------------------------------------------------------------


def test_lr_at_and_train_arguments():
    with pytest.raises(ValueError, match=r"step=-5 is not allowed: .*>= 0"):
        tr.lr_at(-5, TrainConfig())
    with pytest.raises(ValueError, match=r"step=1.5"):
        tr.lr_at(1.5, TrainConfig())
    with pytest.raises(TypeError, match=r"cfg of type dict .*TrainConfig"):
        tr.lr_at(0, {})
    with pytest.raises(TypeError, match=r"corpus of type dict is not allowed: pass a Corpus"):
        train(_cfg(steps=1), corpus={"a": "b"})


def test_generate_seed_and_generator_checks(corpus):
    model = tr.build_model(_cfg(steps=1))
    for seed in (1.5, -1, True):
        with pytest.raises(ValueError, match=rf"seed={seed!r} is not allowed"):
            tr.generate(model, "hi", 2, seed=seed)
    with pytest.raises(TypeError, match=r"model of type str .*GLMMoEModel"):
        tr.generate("m", "hi")
    with pytest.raises(TypeError, match=r"generator=5 is not allowed: .*torch.Generator"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 2, generator=5)


def test_train_preset_and_from_dict_arguments():
    with pytest.raises(
        ValueError, match=r"train_preset got unknown field\(s\) \['foo'\]: allowed are \[.*'steps'"
    ):
        train_preset("tiny", foo=1)
    with pytest.raises(TypeError, match=r"d of type list is not allowed"):
        TrainConfig.from_dict([])


def test_train_config_accepts_the_devices_pick_device_does():
    assert TrainConfig(device="cuda:0").device == "cuda:0"
    assert TrainConfig(device="cuda:1").device == "cuda:1"
    for bad in ("gpu", "cuda:x", "cuda:"):
        with pytest.raises(ValueError, match=rf"device='{bad}' is not allowed: .*'cuda:N'"):
            TrainConfig(device=bad)


def test_data_argument_checks(corpus, tmp_path):
    tok = ByteTokenizer()
    with pytest.raises(TypeError, match=r"ids is a torch.int64 tensor of shape \(\): it must be a 1-D"):
        tok.decode(torch.tensor(65))
    with pytest.raises(TypeError, match=r"texts of type list is not allowed: it must be a dict"):
        split_corpus(["abc"])
    with pytest.raises(TypeError, match=r"val_fraction='0.1' is not allowed"):
        split_corpus({"a": "abc" * 10}, val_fraction="0.1")
    for seed in (1.5, "0", -1, True):
        with pytest.raises(ValueError, match=rf"seed={seed!r} is not allowed"):
            BatchLoader(corpus.train, 4, 8, seed=seed)
    loader = BatchLoader(corpus.train, 4, 8)
    with pytest.raises(ValueError, match=r"state has keys \[\]: it lacks 'generator'"):
        loader.load_state_dict({})
    with pytest.raises(ValueError, match=r"state\['generator'\] is a torch.uint8 tensor of shape \(3,\)"):
        loader.load_state_dict({"generator": torch.zeros(3, dtype=torch.uint8)})
    with pytest.raises(ValueError, match=r"state\['calls'\]=-1"):
        loader.load_state_dict({**loader.state_dict(), "calls": -1})
    with pytest.raises(TypeError, match=r"state of type list"):
        loader.load_state_dict([])
    root = tmp_path / "c"
    info = _write_corpus(root)
    _write_corpus(root, manifest={"domains": ["a"], "files": {"a": {**info, "file": "."}}})
    with pytest.raises(ValueError, match=r"files\['a'\]\['file'\]='\.' is a directory, not a text file"):
        load_corpus(root)


def test_manifest_domains_and_file_names_are_checked(tmp_path):
    import json
    import shutil

    from glm4moe_lib.data import default_data_dir, load_corpus

    root = tmp_path / "corpus"
    shutil.copytree(default_data_dir(), root)
    manifest = json.loads((root / "manifest.json").read_text())
    for change, match in [
        ({"domains": []}, "non-empty list of distinct names"),
        ({"domains": ["prose", "prose"]}, "non-empty list of distinct names"),
        ({"files": {**manifest["files"], "prose": {**manifest["files"]["prose"], "file": "../prose.txt"}}},
         "is not a file name inside"),
    ]:  # fmt: skip
        (root / "manifest.json").write_text(json.dumps({**manifest, **change}))
        with pytest.raises(ValueError, match=match):
            load_corpus(root)
    (root / "manifest.json").write_text(json.dumps(manifest))
    assert set(load_corpus(root)) == set(manifest["domains"])


def test_save_checkpoint_and_collect_routing_name_wrong_arguments(tmp_path):
    from glm4moe_lib.train import build_model, collect_routing, save_checkpoint, train_preset

    cfg = train_preset("tiny", steps=1, batch_size=4, seq_len=16, eval_batches=1, progress=False)
    model = build_model(cfg)
    with pytest.raises(TypeError, match=r"batches\[0\] is a str: expected a Batch"):
        collect_routing(model, ["not a batch"])
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with pytest.raises(TypeError, match="loader is a NoneType: save_checkpoint needs a BatchLoader"):
        save_checkpoint(tmp_path / "c.safetensors", model, opt, sched, None, 0, cfg, {})
    assert not (tmp_path / "c.safetensors").exists()
