"""minimoe.data: the shipped corpus, the character tokenizer and the batch sampler."""

import csv
import io
import json
from pathlib import Path

import pytest
import torch

from minimoe.data import CORPUS_DIR, DOMAINS, CharTokenizer, load_corpus


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


def test_tokenizer_round_trips_every_printable_character_and_newline():
    tok = CharTokenizer()
    text = "".join(chr(c) for c in range(32, 127)) + "\n"
    ids = tok.encode(text)
    assert tok.vocab_size == 96 and ids.dtype == torch.int64
    assert sorted(ids.tolist()) == list(range(96))
    assert tok.decode(ids) == text


def test_tokenizer_rejects_what_it_cannot_represent():
    tok = CharTokenizer()
    with pytest.raises(ValueError, match=r"outside the tokenizer's alphabet.*'\\t'"):
        tok.encode("a\tb")
    with pytest.raises(ValueError, match=r"ids must be in \[0, 96\), got \[96\]"):
        tok.decode([3, 96])


def test_corpus_is_small_ascii_and_documented():
    files = sorted(CORPUS_DIR.glob("*.txt"))
    assert [f.stem for f in files] == sorted(DOMAINS)
    assert sum(f.stat().st_size for f in files) <= 2_000_000
    for f in files:
        f.read_bytes().decode("ascii")  # raises on any non-ASCII byte
    provenance = (CORPUS_DIR / "PROVENANCE.md").read_text()
    for f in files:
        assert f"`{f.name}`" in provenance
    assert "PSF" in provenance and "MIT" in provenance


def test_every_arithmetic_line_is_correct():
    lines = (CORPUS_DIR / "arithmetic.txt").read_text().splitlines()
    assert len(lines) > 5000
    for line in lines:
        left, result = line.split("=")
        op = next(o for o in "+-*" if o in left)
        a, b = (int(v) for v in left.split(op))
        assert int(result) == {"+": a + b, "-": a - b, "*": a * b}[op], line


def test_records_are_valid_csv_and_json():
    blocks = (CORPUS_DIR / "records.txt").read_text().strip().split("\n\n")
    assert len(blocks) > 100
    for block in blocks:
        if block.startswith("id,"):
            rows = list(csv.DictReader(io.StringIO(block)))
            assert rows and all(len(row) == 6 and int(row["qty"]) >= 1 for row in rows)
        else:
            assert all(set(json.loads(line)) == {"id", "name", "city", "item", "qty", "price"}
                       for line in block.splitlines())


def test_splits_hold_every_domain_in_proportion(corpus):
    assert corpus.domain_names == DOMAINS and corpus.vocab_size == 96
    for split in ("train", "val"):
        assert corpus.tokens[split].shape == corpus.domains[split].shape
    train_counts = torch.bincount(corpus.domains["train"], minlength=4)
    val_counts = torch.bincount(corpus.domains["val"], minlength=4)
    share = val_counts / (train_counts + val_counts)
    assert torch.all((share > 0.095) & (share < 0.105)), share
    # the splits are the two ends of each domain's text: the stream is domain 0, then 1, ...
    assert torch.all(corpus.domains["train"].diff() >= 0)
    text = Path(CORPUS_DIR / "code.txt").read_text()
    code_val = corpus.tokenizer.decode(corpus.tokens["val"][corpus.domains["val"] == 1])
    assert text.endswith(code_val) and len(code_val) == val_counts[1]


def test_batch_windows_shift_by_one_and_carry_their_domains(corpus):
    x, y, domain = corpus.batch("train", batch_size=6, seq_len=40, seed=3, step=7)
    assert x.shape == y.shape == domain.shape == (6, 40)
    assert torch.equal(x[:, 1:], y[:, :-1])
    stream = corpus.tokenizer.decode(corpus.tokens["train"])
    for row in range(6):  # locate each window in the stream and read its labels there
        start = stream.find(corpus.tokenizer.decode(torch.cat([x[row], y[row, -1:]])))
        assert torch.equal(domain[row], corpus.domains["train"][start + 1:start + 41])


def test_batches_depend_only_on_seed_and_step(corpus):
    a = corpus.batch("val", 4, 16, seed=1, step=5)
    b = corpus.batch("val", 4, 16, seed=1, step=5)
    c = corpus.batch("val", 4, 16, seed=1, step=6)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])


def test_bad_arguments_name_themselves(corpus):
    with pytest.raises(ValueError, match="split"):
        corpus.batch("test", 4, 16)
    with pytest.raises(ValueError, match="seq_len must be <"):
        corpus.batch("val", 1, 10**7)
    with pytest.raises(ValueError, match="val_fraction"):
        load_corpus(val_fraction=1.0)
    with pytest.raises(ValueError, match="domains"):
        load_corpus(domains=("prose", "poetry"))
