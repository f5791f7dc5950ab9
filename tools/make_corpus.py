"""Write minimoe/corpus/: the four-domain text corpus that chapter 07's language model trains on.

    python tools/make_corpus.py

Domains (about 150 kB each, ASCII only):
  prose       English paragraphs of the Python Language Reference, as shipped in CPython's
              `pydoc_data.topics` (indented grammar and code examples removed)
  code        Python source of pure-Python standard-library modules
  arithmetic  generated integer sums, differences and products with their results, one per line
  records     generated CSV rows and JSON objects about fictional people and orders

prose and code come from the running interpreter's standard library, so their exact text depends
on the CPython version (3.11.7 wrote the shipped files); arithmetic and records depend only on the
seed. Provenance and licences: minimoe/corpus/PROVENANCE.md.
"""

import json
import pydoc_data.topics
import random
import sysconfig
import unicodedata
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "minimoe" / "corpus"
DOMAIN_BYTES = 150_000
SEED = 2024
CODE_MODULES = ("textwrap", "heapq", "bisect", "colorsys", "fractions", "statistics", "functools", "string",
                "shlex", "graphlib", "calendar", "fnmatch", "glob", "operator", "queue", "sched", "numbers",
                "copy", "reprlib", "csv", "json/encoder", "json/decoder")


def ascii_only(text: str) -> str:
    """Fold accents and typographic characters to ASCII; drop what has no ASCII form."""
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')
    text = text.replace("\u2013", "-").replace("\u2014", "--").replace("\u2026", "...")
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")


def truncate_at_line(text: str, size: int) -> str:
    """The first whole lines of `text` holding at most `size` characters."""
    return text[: text.rfind("\n", 0, size) + 1] if len(text) > size else text


def prose() -> str:
    paragraphs = []
    for name in sorted(pydoc_data.topics.topics):
        for block in pydoc_data.topics.topics[name].split("\n\n"):
            lines = block.strip("\n").splitlines()
            if lines and not any(line.startswith("  ") for line in lines) and len(block) > 80:
                paragraphs.append(" ".join(line.strip() for line in lines))
    return truncate_at_line(ascii_only("\n\n".join(paragraphs)) + "\n", DOMAIN_BYTES)


def code() -> str:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = [(stdlib / f"{module}.py").read_text() for module in CODE_MODULES]
    return truncate_at_line(ascii_only("\n\n".join(sources)), DOMAIN_BYTES)


def arithmetic(rng: random.Random) -> str:
    lines, size = [], 0
    while size < DOMAIN_BYTES:
        a, b = rng.randrange(1000), rng.randrange(1000)
        op = rng.choice("+-*")
        if op == "*":
            b = rng.randrange(100)
        result = {"+": a + b, "-": a - b, "*": a * b}[op]
        line = f"{a}{op}{b}={result}\n"
        lines.append(line)
        size += len(line)
    return truncate_at_line("".join(lines), DOMAIN_BYTES)


FIRST = ("Ada", "Alan", "Grace", "Edsger", "Barbara", "Donald", "Frances", "John", "Radia", "Ken", "Sophie",
         "Tim", "Margaret", "Dennis", "Lynn", "Niklaus", "Hedy", "Claude", "Katherine", "Linus")
LAST = ("Okafor", "Lindqvist", "Moreau", "Tanaka", "Silva", "Novak", "Haddad", "Kowalski", "Nguyen", "Brennan",
        "Castillo", "Ivanova", "Mensah", "Schmidt", "Rossi", "Dubois", "Kim", "Patel", "Olsen", "Ferreira")
CITIES = ("Lisbon", "Accra", "Osaka", "Tromso", "Quito", "Lyon", "Perth", "Tartu", "Pune", "Halifax")
ITEMS = ("keyboard", "monitor", "cable", "lamp", "chair", "notebook", "headset", "router", "desk", "webcam")


def records(rng: random.Random) -> str:
    """Blocks of CSV (with a header) and of JSON lines, alternating."""
    blocks, size, order_id = [], 0, 10_000
    while size < DOMAIN_BYTES:
        rows = []
        for _ in range(rng.randrange(4, 12)):
            order_id += rng.randrange(1, 9)
            rows.append({"id": order_id, "name": f"{rng.choice(FIRST)} {rng.choice(LAST)}",
                         "city": rng.choice(CITIES), "item": rng.choice(ITEMS), "qty": rng.randrange(1, 6),
                         "price": round(rng.uniform(2, 400), 2)})
        if len(blocks) % 2 == 0:
            block = "id,name,city,item,qty,price\n" + "".join(
                f"{r['id']},{r['name']},{r['city']},{r['item']},{r['qty']},{r['price']:.2f}\n" for r in rows)
        else:
            block = "".join(json.dumps(r) + "\n" for r in rows)
        blocks.append(block + "\n")
        size += len(block) + 1
    return truncate_at_line("".join(blocks), DOMAIN_BYTES)


def main() -> None:
    rng = random.Random(SEED)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in (("prose", prose()), ("code", code()), ("arithmetic", arithmetic(rng)),
                       ("records", records(rng))):
        (OUT / f"{name}.txt").write_text(text)
        print(f"{name:>10}: {len(text):,} characters")


if __name__ == "__main__":
    main()
