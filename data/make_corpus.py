"""Generate the course's multi-domain text corpus, deterministically, from one seed.

Four domains with clearly different statistics, so that expert specialization can be seen:

* ``prose``   English-like sentences from a small grammar (letters, spaces, punctuation)
* ``math``    arithmetic facts, one per line (digits and operators: ``17 + 25 = 42``)
* ``code``    small Python-like functions (keywords, indentation, brackets)
* ``records`` JSON-lines records (quotes, braces, keys, names and numbers)

Output: ``data/corpus/<domain>.txt`` and ``data/corpus/manifest.json`` (sizes and SHA-256 of every
file; ``glm4moe_lib.data.load_corpus`` checks them on load). Run from anywhere::

    python data/make_corpus.py            # writes data/corpus/
    python data/make_corpus.py --check    # regenerates in memory, compares manifest and every file

Only the Python standard library is used, and ``random.Random(seed)`` per domain, so the output
is the same on every machine and Python version >= 3.10.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from pathlib import Path

SEED = 1234
VERSION = 1
DOMAINS = ("prose", "math", "code", "records")
TARGET_BYTES = 120_000  # per domain: about 0.5 MB in all
OUT_DIR = Path(__file__).resolve().parent / "corpus"

# ---- prose ---------------------------------------------------------------------------------------
_ADJ = "old young quiet bright tired clever small gentle brave curious dark green silent proud".split()
_NOUN = (
    "fisherman teacher river village garden merchant child sailor baker forest storm lantern "
    "window traveler dog market letter mountain"
).split()
_VERB_T = "found carried watched followed remembered opened painted crossed visited heard".split()
_VERB_I = "waited laughed slept wandered listened smiled returned hesitated sang rested".split()
_ADV = "slowly quietly early again suddenly carefully often softly".split()
_PREP = "near across under behind beside through toward".split()
_CONJ = ["and then", "but", "while", "because", "so"]


def _np(r: random.Random) -> str:
    det = r.choice(["the", "a", "the", "every", "that"])
    if r.random() < 0.6:
        return f"{det} {r.choice(_ADJ)} {r.choice(_NOUN)}"
    return f"{det} {r.choice(_NOUN)}"


def _clause(r: random.Random) -> str:
    if r.random() < 0.55:
        s = f"{_np(r)} {r.choice(_VERB_T)} {_np(r)}"
    else:
        s = f"{_np(r)} {r.choice(_VERB_I)}"
    if r.random() < 0.4:
        s += f" {r.choice(_PREP)} {_np(r)}"
    if r.random() < 0.3:
        s += f" {r.choice(_ADV)}"
    return s


def prose(r: random.Random) -> str:
    """One paragraph of 2-5 sentences."""
    sentences = []
    for _ in range(r.randint(2, 5)):
        s = _clause(r)
        if r.random() < 0.35:
            s += f", {r.choice(_CONJ)} {_clause(r)}"
        sentences.append(s[0].upper() + s[1:] + r.choice([".", ".", ".", "!", "?"]))
    return " ".join(sentences) + "\n"


# ---- math ----------------------------------------------------------------------------------------


def math(r: random.Random) -> str:
    """A block of 4-8 arithmetic facts."""
    lines = []
    for _ in range(r.randint(4, 8)):
        op = r.choice("+-*")
        if op == "*":
            a, b = r.randint(2, 19), r.randint(2, 19)
            c = a * b
        else:
            a, b = r.randint(0, 999), r.randint(0, 999)
            if op == "-" and b > a:
                a, b = b, a
            c = a + b if op == "+" else a - b
        lines.append(f"{a} {op} {b} = {c}")
    return "\n".join(lines) + "\n"


# ---- code ----------------------------------------------------------------------------------------
_FN = "total scale merge count clamp filter_pos running_max mean_of pairs shift".split()
_VAR = "xs ys items values data nums row seq".split()
_OPS = ["+", "-", "*"]


def code(r: random.Random) -> str:
    """One small Python function."""
    name = f"{r.choice(_FN)}_{r.randint(0, 99)}"
    xs, k = r.choice(_VAR), r.choice(["n", "k", "step", "limit"])
    acc = r.choice(["acc", "result", "out", "s"])
    kind = r.randint(0, 3)
    lines = [f"def {name}({xs}, {k}):"]
    if kind == 0:
        lines += [f"    {acc} = 0", f"    for x in {xs}:", f"        {acc} += x {r.choice(_OPS)} {k}"]
    elif kind == 1:
        lines += [
            f"    {acc} = []",
            f"    for i, x in enumerate({xs}):",
            f"        if x > {k}:",
            f"            {acc}.append(i)",
        ]
    elif kind == 2:
        lines += [f"    {acc} = [x {r.choice(_OPS)} {k} for x in {xs} if x != {r.randint(0, 9)}]"]
    else:
        lines += [
            f"    {acc} = {{}}",
            f"    for x in {xs}:",
            f"        {acc}[x % {k}] = {acc}.get(x % {k}, 0) + 1",
        ]
    lines.append(f"    return {acc}")
    return "\n".join(lines) + "\n"


# ---- records -------------------------------------------------------------------------------------
_FIRST = "Ada Ben Chloe Dev Emil Farah Goran Hana Ivo Jun Kira Luca Mina Noor Omar Pia".split()
_LAST = "Brooks Chen Diaz Eriksen Fischer Garcia Haddad Ito Jones Kowalski Lund Moreau Novak".split()
_CITY = "Lyon Oslo Porto Kyoto Lima Cairo Quito Perth Turin Dakar Hanoi Riga".split()
_DEPT = "sales research support finance design ops".split()


def records(r: random.Random) -> str:
    """One JSON record per line, a block of 2-4."""
    lines = []
    for _ in range(r.randint(2, 4)):
        rec = {
            "id": r.randint(1000, 9999),
            "name": f"{r.choice(_FIRST)} {r.choice(_LAST)}",
            "city": r.choice(_CITY),
            "age": r.randint(19, 77),
            "dept": r.choice(_DEPT),
            "active": r.random() < 0.7,
        }
        lines.append(json.dumps(rec))
    return "\n".join(lines) + "\n"


GENERATORS = {"prose": prose, "math": math, "code": code, "records": records}


def generate(seed: int = SEED, target_bytes: int = TARGET_BYTES) -> dict[str, str]:
    """The text of every domain: documents separated by blank lines, about ``target_bytes`` each."""
    texts = {}
    for i, domain in enumerate(DOMAINS):
        r = random.Random(seed * 1000 + i)
        docs: list[str] = []
        size = 0
        while size < target_bytes:
            doc = GENERATORS[domain](r)
            docs.append(doc)
            size += len(doc) + 1
        texts[domain] = "\n".join(docs)
    return texts


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest(texts: dict[str, str], seed: int = SEED) -> dict:
    """Sizes and SHA-256 of every domain file."""
    files = {}
    for domain, text in texts.items():
        raw = text.encode("utf-8")
        files[domain] = {"file": f"{domain}.txt", "bytes": len(raw), "sha256": sha256(raw)}
    return {"version": VERSION, "seed": seed, "domains": list(texts), "files": files}


def write(out_dir: Path = OUT_DIR, seed: int = SEED) -> dict:
    """Write every domain file and the manifest into ``out_dir``; return the manifest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = generate(seed)
    for domain, text in texts.items():
        (out_dir / f"{domain}.txt").write_bytes(text.encode("utf-8"))
    man = manifest(texts, seed)
    (out_dir / "manifest.json").write_text(json.dumps(man, indent=2) + "\n")
    return man


def check(out_dir: Path = OUT_DIR, seed: int = SEED) -> list[str]:
    """What differs between ``out_dir`` and the generator's output: one line per problem (none: it
    matches). Compares the manifest and the SHA-256 of every file the generator would write."""
    expected = manifest(generate(seed), seed)
    problems = []
    manifest_path = out_dir / "manifest.json"
    try:
        stored = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        problems.append(f"{manifest_path}: missing")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        problems.append(f"{manifest_path}: unreadable ({type(exc).__name__}: {exc})")
    else:
        if stored != expected:
            problems.append(f"{manifest_path}: differs from the generator's manifest")
    for domain, info in expected["files"].items():
        path = out_dir / info["file"]
        if not path.is_file():
            problems.append(f"{path}: missing (domain {domain!r})")
            continue
        raw = path.read_bytes()
        if sha256(raw) != info["sha256"]:
            problems.append(
                f"{path}: differs (domain {domain!r}): sha256 {sha256(raw)[:16]}... ({len(raw)} bytes), "
                f"expected {info['sha256'][:16]}... ({info['bytes']} bytes)"
            )
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate the multi-domain corpus (deterministic).")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder (default data/corpus)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument(
        "--check", action="store_true", help="compare the manifest and every file with the generator's output"
    )
    args = parser.parse_args(argv)
    if args.check:
        problems = check(args.out, args.seed)
        if not problems:
            print(f"corpus in {args.out} matches its generator (manifest and every file)")
            return 0
        print(f"corpus in {args.out} differs from its generator:", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        print("regenerate it with `python data/make_corpus.py`", file=sys.stderr)
        return 1
    man = write(args.out, args.seed)
    for domain, info in man["files"].items():
        print(f"{domain:8s} {info['bytes']:8d} bytes  sha256 {info['sha256'][:16]}...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
