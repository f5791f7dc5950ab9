"""The course's data: the shipped four-domain corpus (prose, code, arithmetic, records) with a
character tokenizer and a seeded batch sampler, for chapter 07's language model; and a synthetic
clustered task (`make_task`) for the routing experiments of chapters 04-06 and the
expert-parallel demo of chapter 10.

    corpus = load_corpus()
    x, y, domain = corpus.batch("train", batch_size=32, seq_len=128, seed=0, step=0)
    batch = make_task().sample(256, seed=0)     # x [T, d], token_ids, clusters, labels

Every character carries the id of its domain, so routing can be compared with the domains.
The files and their licences: minimoe/corpus/PROVENANCE.md (written by tools/make_corpus.py).
"""

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from minimoe import _checks

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
DOMAINS = ("prose", "code", "arithmetic", "records")
SPLITS = ("train", "val")


class CharTokenizer:
    """Printable ASCII (space .. '~') and newline: 96 ids, the same for any text."""

    alphabet = "\n" + "".join(chr(c) for c in range(32, 127))

    def __init__(self):
        self._ids = {char: i for i, char in enumerate(self.alphabet)}

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet)

    def encode(self, text: str) -> torch.Tensor:
        """text -> [len(text)] int64 ids. Any character outside the alphabet is an error."""
        unknown = sorted(set(text) - self._ids.keys())
        if unknown:
            raise ValueError(f"text has characters outside the tokenizer's alphabet (printable ASCII and "
                             f"newline): {unknown[:10]}")
        return torch.tensor([self._ids[char] for char in text], dtype=torch.int64)

    def decode(self, ids) -> str:
        """[n] ids (tensor or sequence) -> text."""
        ids = torch.as_tensor(ids).reshape(-1).tolist()
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids must be in [0, {self.vocab_size}), got {bad[:10]}")
        return "".join(self.alphabet[i] for i in ids)


@dataclass
class Corpus:
    """Token ids and domain ids of each split, as one stream per split (domains one after another).

    tokens[split]   [N] int64 character ids
    domains[split]  [N] int64 index into `domain_names`
    The validation split is the last `val_fraction` of every domain's text, so both splits hold
    all four domains in the same proportions.
    """

    tokens: dict
    domains: dict
    domain_names: tuple
    tokenizer: CharTokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def batch(self, split: str, batch_size: int, seq_len: int, seed: int = 0, step: int = 0):
        """Random windows of split: (x [B, L], y [B, L] = x shifted by one, domain [B, L] of y).

        The windows depend only on (seed, step), so a resumed run sees the same batches."""
        _checks.choice("split", split, SPLITS)
        batch_size = _checks.positive_int("batch_size", batch_size)
        seq_len = _checks.positive_int("seq_len", seq_len)
        tokens, domains = self.tokens[split], self.domains[split]
        if seq_len + 1 > tokens.numel():
            raise ValueError(f"seq_len must be < {tokens.numel()} (the {split} split's length), got {seq_len}")
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        starts = torch.randint(tokens.numel() - seq_len, (batch_size,), generator=generator)
        window = starts[:, None] + torch.arange(seq_len + 1)
        return tokens[window[:, :-1]], tokens[window[:, 1:]], domains[window[:, 1:]]


def load_corpus(val_fraction: float = 0.1, domains=DOMAINS) -> Corpus:
    """Read the shipped corpus and split each domain's text at 1 - val_fraction (cut at a line)."""
    if not 0 < _checks.non_negative("val_fraction", val_fraction) < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if isinstance(domains, str) or not domains:
        raise ValueError(f"domains must be a non-empty sequence of names from {DOMAINS}, got {domains!r}")
    domains = tuple(_checks.choice("domains", name, DOMAINS) for name in domains)
    tokenizer = CharTokenizer()
    parts = {split: ([], []) for split in SPLITS}
    for index, name in enumerate(domains):
        text = (CORPUS_DIR / f"{name}.txt").read_text()
        cut = text.rfind("\n", 0, round(len(text) * (1 - val_fraction))) + 1
        for split, piece in (("train", text[:cut]), ("val", text[cut:])):
            ids = tokenizer.encode(piece)
            parts[split][0].append(ids)
            parts[split][1].append(torch.full_like(ids, index))
    return Corpus({split: torch.cat(parts[split][0]) for split in SPLITS},
                  {split: torch.cat(parts[split][1]) for split in SPLITS}, domains, tokenizer)


# ---- a synthetic clustered task ----

@dataclass
class ClusterTask:
    """Tokens from K clusters in d dims with C classes.

    Token id v (vocabulary of V = K * M ids) belongs to cluster v % K and sits at
    centres[v % K] + offsets[v]; a token is x = that point + N(0, I) noise. Its label is cluster
    k's own linear rule, argmax_c ((x - centres[k]) @ rules[k])_c, so no single linear map solves
    the task but one small expert per cluster can. All centres share a common `shift`: real hidden
    states are not centred either, and a bias-free router sees the shift as a per-expert bias.

    centres [K, d], offsets [V, d], rules [K, d, C]
    """

    centres: torch.Tensor
    offsets: torch.Tensor
    rules: torch.Tensor

    @property
    def num_clusters(self) -> int:
        return self.centres.shape[0]

    @property
    def vocab_size(self) -> int:
        return self.offsets.shape[0]

    @property
    def d_model(self) -> int:
        return self.centres.shape[1]

    @property
    def num_classes(self) -> int:
        return self.rules.shape[2]

    def sample(self, num_tokens: int, seed: int = 0, cluster_probs=None) -> dict:
        """num_tokens tokens -> dict of x [T, d], token_ids [T], clusters [T], labels [T].
        cluster_probs [K] skews the mix of clusters (default: uniform)."""
        num_tokens = _checks.positive_int("num_tokens", num_tokens)
        gen = torch.Generator().manual_seed(seed)
        K = self.num_clusters
        probs = torch.full((K,), 1.0 / K) if cluster_probs is None else _probabilities(cluster_probs, K)
        clusters = torch.multinomial(probs, num_tokens, replacement=True, generator=gen)
        token_ids = clusters + K * torch.randint(self.vocab_size // K, (num_tokens,), generator=gen)
        local = self.offsets[token_ids] + torch.randn(num_tokens, self.d_model, generator=gen)
        labels = torch.einsum("td,tdc->tc", local, self.rules[clusters]).argmax(-1)
        return dict(x=self.centres[clusters] + local, token_ids=token_ids, clusters=clusters, labels=labels)


def _probabilities(p, size: int) -> torch.Tensor:
    p = torch.as_tensor(p, dtype=torch.float32)
    if p.shape != (size,) or (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"cluster_probs must be {size} non-negative numbers with a positive sum, got {p.tolist()}")
    return p / p.sum()


def make_task(d_model: int = 16, num_clusters: int = 8, num_classes: int = 4, ids_per_cluster: int = 8,
              spread: float = 1.0, shift: float = 6.0, seed: int = 0) -> ClusterTask:
    """A `ClusterTask`: centres ~ N(0, spread^2 I) + a common shift of norm `shift`,
    offsets ~ N(0, 0.5^2 I), rules ~ N(0, 1)."""
    for name, value in (("d_model", d_model), ("num_clusters", num_clusters), ("num_classes", num_classes),
                        ("ids_per_cluster", ids_per_cluster)):
        _checks.positive_int(name, value)
    _checks.non_negative("spread", spread)
    _checks.non_negative("shift", shift)
    gen = torch.Generator().manual_seed(seed)
    direction = F.normalize(torch.randn(d_model, generator=gen), dim=0)
    centres = spread * torch.randn(num_clusters, d_model, generator=gen) + shift * direction
    offsets = 0.5 * torch.randn(num_clusters * ids_per_cluster, d_model, generator=gen)
    rules = torch.randn(num_clusters, d_model, num_classes, generator=gen)
    return ClusterTask(centres, offsets, rules)
