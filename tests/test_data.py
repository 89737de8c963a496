"""The corpus: deterministic generator, checksums, tokenizer, split and batches."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from glm4moe_lib.data import (
    DOMAINS,
    BatchLoader,
    ByteTokenizer,
    default_data_dir,
    eval_batches,
    load_corpus,
    split_corpus,
)

ROOT = Path(__file__).resolve().parent.parent


def _make_corpus_module():
    spec = importlib.util.spec_from_file_location("make_corpus", ROOT / "data" / "make_corpus.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def texts():
    return load_corpus()


def test_generator_is_deterministic_and_matches_committed_files():
    mc = _make_corpus_module()
    a, b = mc.generate(), mc.generate()
    assert a == b
    stored = json.loads((default_data_dir() / "manifest.json").read_text())
    assert mc.manifest(a) == stored
    assert mc.generate(seed=mc.SEED + 1) != a


def test_corpus_is_small_and_has_four_domains(texts):
    assert tuple(texts) == DOMAINS
    total = sum(p.stat().st_size for p in default_data_dir().iterdir())
    assert total < 5_000_000
    # clearly different statistics: digits dominate math, braces/quotes only in records
    digits = {d: sum(c.isdigit() for c in t) / len(t) for d, t in texts.items()}
    assert digits["math"] > 0.4 > 0.01 > digits["prose"]
    assert texts["records"].count("{") > 1000 and texts["prose"].count("{") == 0
    assert "def " in texts["code"] and "def " not in texts["prose"]


def _copy_corpus(tmp_path: Path) -> Path:
    dst = tmp_path / "corpus"
    shutil.copytree(default_data_dir(), dst)
    return dst


def test_corrupt_file_is_a_clear_error(tmp_path):
    root = _copy_corpus(tmp_path)
    raw = bytearray((root / "math.txt").read_bytes())
    raw[100] ^= 1  # one flipped bit
    (root / "math.txt").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"math\.txt.*corrupt.*sha256"):
        load_corpus(root)


def test_missing_file_and_missing_manifest_are_clear_errors(tmp_path):
    root = _copy_corpus(tmp_path)
    (root / "code.txt").unlink()
    with pytest.raises(ValueError, match=r"code\.txt.*missing"):
        load_corpus(root)
    with pytest.raises(ValueError, match=r"path=.*no manifest\.json"):
        load_corpus(tmp_path / "nowhere")
    (root / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid corpus manifest"):
        load_corpus(root)


@pytest.mark.parametrize("text", ["", "hello, world\n", "x = [1, 2]  # ünïcødé ✓", '\t{"a": 1}\n'])
def test_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.dtype == torch.long and (ids < tok.vocab_size).all()
    assert tok.decode(ids) == text
    with pytest.raises(ValueError, match="ids contains 300"):
        tok.decode([65, 300])


def test_split_and_loader_shapes(texts):
    corpus = split_corpus(texts, val_fraction=0.1)
    for d in DOMAINS:
        n_train, n_val = len(corpus.train[d]), len(corpus.val[d])
        assert abs(n_val / (n_train + n_val) - 0.1) < 0.01
    loader = BatchLoader(corpus.train, batch_size=8, seq_len=32, seed=3)
    b = loader.next()
    assert b.x.shape == b.y.shape == (8, 32) and b.domain.tolist() == [0, 1, 2, 3] * 2
    assert torch.equal(b.x[:, 1:], b.y[:, :-1])  # y is x shifted by one
    # rows of a domain come from that domain (math rows are mostly digits/operators)
    tok = ByteTokenizer()
    assert sum(c.isdigit() for c in tok.decode(b.x[1])) > 8
    # seeded and resumable
    state = loader.state_dict()
    nxt = loader.next()
    loader.load_state_dict(state)
    assert torch.equal(loader.next().x, nxt.x)
    assert torch.equal(BatchLoader(corpus.train, 8, 32, seed=3).next().x, b.x)
    ev = eval_batches(corpus.val, batch_size=8, seq_len=32, n_batches=3)
    assert len(ev) == 3 and all(e.x.shape == (8, 32) for e in ev)
    assert torch.equal(ev[0].x, eval_batches(corpus.val, 8, 32, 3)[0].x)


def test_bad_sizes_are_clear_errors(texts):
    corpus = split_corpus(texts)
    with pytest.raises(ValueError, match="batch_size=0"):
        BatchLoader(corpus.train, batch_size=0, seq_len=8)
    with pytest.raises(ValueError, match="seq_len=10000000"):
        BatchLoader(corpus.train, batch_size=2, seq_len=10_000_000)
    with pytest.raises(ValueError, match="val_fraction=1.5"):
        split_corpus(texts, val_fraction=1.5)


def _old_next(loader):
    """The loader before the domain rotation (row i is domain i % D): results to keep."""
    dom = torch.arange(loader.batch_size) % len(loader.domains)
    xs = []
    for d in dom.tolist():
        ids = loader.data[loader.domains[d]]
        start = int(torch.randint(0, len(ids) - loader.seq_len, (1,), generator=loader.generator))
        xs.append(ids[start : start + loader.seq_len])
    return torch.stack(xs), dom


@pytest.mark.parametrize("batch_size", [2, 3, 6])
def test_loader_rotates_domains_for_equal_shares(texts, batch_size):
    corpus = split_corpus(texts)
    loader = BatchLoader(corpus.train, batch_size=batch_size, seq_len=8, seed=0)
    domains = torch.cat([loader.next().domain for _ in range(12)])  # 12 batches: a multiple of 4 / gcd
    assert torch.bincount(domains, minlength=4).tolist() == [12 * batch_size // 4] * 4
    # the rotation is part of the state: a restored loader continues with the same domains
    state = loader.state_dict()
    assert state["calls"] == 12
    b = loader.next()
    fresh = BatchLoader(corpus.train, batch_size=batch_size, seq_len=8, seed=5)
    fresh.load_state_dict(state)
    again = fresh.next()
    assert torch.equal(again.x, b.x) and torch.equal(again.domain, b.domain)


def test_loader_with_a_multiple_of_the_domains_is_unchanged(texts):
    corpus = split_corpus(texts)
    loader = BatchLoader(corpus.train, batch_size=8, seq_len=16, seed=3)
    old = BatchLoader(corpus.train, batch_size=8, seq_len=16, seed=3)
    for _ in range(5):
        b = loader.next()
        x, dom = _old_next(old)
        assert torch.equal(b.x, x) and torch.equal(b.domain, dom)
    # a state from before the rotation (no "calls") restores as the start of the rotation
    loader.load_state_dict({"generator": old.generator.get_state()})
    assert loader.calls == 0 and torch.equal(loader.next().x, _old_next(old)[0])


def test_make_corpus_check_hashes_every_file(tmp_path, capsys):
    mc = _make_corpus_module()
    root = _copy_corpus(tmp_path)
    assert mc.main(["--check", "--out", str(root)]) == 0
    assert "matches its generator" in capsys.readouterr().out
    raw = bytearray((root / "math.txt").read_bytes())
    raw[100] ^= 1
    (root / "math.txt").write_bytes(bytes(raw))
    (root / "code.txt").unlink()
    assert mc.main(["--check", "--out", str(root)]) == 1
    err = capsys.readouterr().err
    assert "math.txt: differs" in err and "code.txt: missing" in err and "prose.txt" not in err
    (root / "manifest.json").unlink()
    assert mc.main(["--check", "--out", str(root)]) == 1
    assert "manifest.json: missing" in capsys.readouterr().err
