"""Regenerate the offline data shipped in `m2jax/data/assets/`.

Two Debian (bookworm) packages are the only inputs:

* `python3.11-doc` 3.11.2-6+deb12u9: the Python 3.11 documentation (PSF License Agreement).
  Its HTML pages become `python_docs_corpus.jsonl.gz`, an English prose corpus for masked-LM
  pretraining: one JSON object per line, `{"text": ..., "source": "<page>#<n>"}`, one document
  per second-level section (a page's introduction is its own document). Code listings, tables
  of contents and navigation are dropped; only prose elements (paragraphs, list items,
  definitions, headings, notes) are kept.
* `wordnet-base` 1:3.0-37: WordNet 3.0 (WordNet 3.0 licence). Its synset glosses become
  `WNSENSE/{train,dev}.tsv`, a sentence-pair task in GLUE TSV layout: sentence1 is an example
  sentence for a word sense, sentence2 a definition, label 1 when the definition is that of the
  sense the example illustrates and 0 when it is the definition of another sense of the same word
  (same part of speech). One positive and one negative pair per example, so classes are balanced.
  The same glosses also give `WNPOS/{train,dev}.tsv`, a single-sentence task: is a definition
  that of a noun (0) or of a verb (1)? Balanced, split by word.

Usage (any machine with apt; the output is byte-identical for the same package versions):

    apt-get download python3.11-doc=3.11.2-6+deb12u9 wordnet-base=1:3.0-37
    python scripts/make_embedded_data.py --python-doc-deb python3.11-doc_*.deb \
        --wordnet-deb wordnet-base_*.deb --out m2jax/data/assets
"""

from __future__ import annotations

import argparse
import gzip
import html.parser
import io
import json
import pathlib
import random
import re
import subprocess
import tempfile

# Elements whose text is prose worth keeping, and elements whose whole subtree is not prose.
_PROSE_TAGS = {"p", "li", "dd", "dt", "h1", "h2", "h3", "h4", "blockquote"}
_SKIP_TAGS = {"pre", "script", "style", "table", "nav"}
_SKIP_CLASSES = {"headerlink", "sphinxsidebar", "related", "footer", "highlight", "toctree-wrapper"}
# Index pages, changelogs and license texts are lists of names, not prose.
_SKIP_PAGES = re.compile(r"^(genindex|py-modindex|search|contents|license|copyright|whatsnew/changelog)")
_MIN_DOC_CHARS = 200
TRAIN_PAIRS, DEV_PAIRS = 4000, 1000
# WNPOS (noun or verb definition?): rows per split, half of each class.
POS_TRAIN_ROWS, POS_DEV_ROWS = 4000, 1000


class _ProseExtractor(html.parser.HTMLParser):
    """Collects prose blocks of a Sphinx page's main body, split into documents at each <h2>."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.docs: list[list[str]] = [[]]
        self._stack: list[tuple[str, bool]] = []  # (tag, starts a skipped subtree)
        self._skip_depth = 0
        self._in_body = 0
        self._block: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = set((attrs.get("class") or "").split())
        if tag in {"br", "img", "meta", "link", "hr", "input"}:
            return
        skip = tag in _SKIP_TAGS or bool(classes & _SKIP_CLASSES)
        body = attrs.get("role") == "main"
        self._stack.append((tag, skip, body))
        self._skip_depth += skip
        self._in_body += body
        if self._in_body and not self._skip_depth and tag in _PROSE_TAGS:
            if tag == "h2" and any(self.docs[-1]):
                self.docs.append([])
            self._flush()
            self._block = []

    def handle_endtag(self, tag):
        if tag in {"br", "img", "meta", "link", "hr", "input"}:
            return
        # Pop until the matching tag: Sphinx HTML is well formed, this only guards stray tags.
        while self._stack:
            open_tag, skip, body = self._stack.pop()
            self._skip_depth -= skip
            self._in_body -= body
            if open_tag == tag:
                break
        if tag in _PROSE_TAGS:
            self._flush()

    def handle_data(self, data):
        if self._block is not None and self._in_body and not self._skip_depth:
            self._block.append(data)

    def _flush(self):
        if self._block is not None:
            text = " ".join("".join(self._block).split())
            if text:
                self.docs[-1].append(text)
        self._block = None


def _unpack(deb: pathlib.Path, into: pathlib.Path) -> pathlib.Path:
    subprocess.run(["dpkg-deb", "-x", str(deb), str(into)], check=True)
    return into


def make_corpus(html_root: pathlib.Path) -> list[dict[str, str]]:
    """Returns the corpus documents in a fixed order (sorted page paths)."""
    docs = []
    for page in sorted(html_root.rglob("*.html")):
        rel = page.relative_to(html_root).as_posix()
        if rel.startswith("_") or _SKIP_PAGES.match(rel):
            continue
        parser = _ProseExtractor()
        parser.feed(page.read_text(encoding="utf-8"))
        parser.close()
        for n, blocks in enumerate(parser.docs):
            text = "\n".join(blocks)
            if len(text) >= _MIN_DOC_CHARS:
                docs.append({"text": text, "source": f"python-3.11-doc/{rel}#{n}"})
    return docs


def _parse_wordnet(wn_dir: pathlib.Path):
    """Yields (pos, synset offset, lemmas, definition, examples) for every synset."""
    for pos in ("noun", "verb", "adj", "adv"):
        for line in (wn_dir / f"data.{pos}").read_text(encoding="latin-1").splitlines():
            if line.startswith("  "):  # licence header
                continue
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            n_words = int(fields[3], 16)
            lemmas = [fields[4 + 2 * i].lower() for i in range(n_words)]
            lemmas = [re.sub(r"\(.*\)$", "", w) for w in lemmas]  # adjective markers like (a)
            parts = [p.strip() for p in gloss.strip().split(";")]
            definition = "; ".join(p for p in parts if not p.startswith('"'))
            examples = [p.strip('"').strip() for p in parts if p.startswith('"')]
            yield pos, fields[0], lemmas, definition, examples


def make_sense_task(wn_dir: pathlib.Path, seed: int = 0) -> dict[str, list[tuple[str, str, int]]]:
    """Builds balanced (example, definition, label) pairs, split disjointly by lemma."""
    synsets = list(_parse_wordnet(wn_dir))
    senses: dict[tuple[str, str], list[int]] = {}
    for i, (pos, _, lemmas, _, _) in enumerate(synsets):
        for lemma in lemmas:
            senses.setdefault((pos, lemma), []).append(i)
    rng = random.Random(seed)
    by_lemma: dict[tuple[str, str], list[tuple[str, str, int]]] = {}
    for i, (pos, _, lemmas, definition, examples) in enumerate(synsets):
        for example in examples:
            # The example must show one of the synset's words, and that word must have
            # another sense to draw a wrong definition from.
            words = [w for w in lemmas if w.replace("_", " ") in example.lower()]
            words = [w for w in words if len(senses[(pos, w)]) > 1]
            if not words or not definition:
                continue
            word = words[0]
            other = rng.choice([j for j in senses[(pos, word)] if j != i])
            pairs = [(example, definition, 1), (example, synsets[other][3], 0)]
            by_lemma.setdefault((pos, word), []).extend(pairs)
    keys = sorted(by_lemma)
    rng.shuffle(keys)
    # Whole lemmas go to one split, so dev examples never share a word with train.
    out: dict[str, list[tuple[str, str, int]]] = {"train": [], "dev": []}
    for key in keys:
        target = "dev" if len(out["dev"]) < DEV_PAIRS else "train"
        if target == "train" and len(out["train"]) >= TRAIN_PAIRS:
            break
        out[target].extend(by_lemma[key])
    return out


def make_pos_task(wn_dir: pathlib.Path, seed: int = 0) -> dict[str, list[tuple[str, int]]]:
    """Balanced (definition, label) rows, label 1 for a verb synset and 0 for a noun synset;
    split by the synset's first lemma so that dev definitions never define a train word."""
    rng = random.Random(seed)
    by_lemma: dict[str, list[tuple[str, int]]] = {}
    for pos, _, lemmas, definition, _ in _parse_wordnet(wn_dir):
        if pos in ("noun", "verb") and definition:
            by_lemma.setdefault(lemmas[0], []).append((definition, int(pos == "verb")))
    keys = sorted(by_lemma)
    rng.shuffle(keys)
    per_class = {"dev": POS_DEV_ROWS // 2, "train": POS_TRAIN_ROWS // 2}
    out: dict[str, list[tuple[str, int]]] = {"train": [], "dev": []}
    counts = {(split, label): 0 for split in out for label in (0, 1)}
    for key in keys:
        split = "dev" if min(counts["dev", 0], counts["dev", 1]) < per_class["dev"] else "train"
        for definition, label in by_lemma[key]:
            if counts[split, label] < per_class[split]:
                out[split].append((definition, label))
                counts[split, label] += 1
        if all(counts[s, lab] >= per_class[s] for s in out for lab in (0, 1)):
            break
    for rows in out.values():
        rng.shuffle(rows)
    return out


def _write_single_tsv(path: pathlib.Path, rows: list[tuple[str, int]]) -> None:
    lines = ["index\tsentence\tlabel"]
    for n, (text, label) in enumerate(rows):
        lines.append(f"{n}\t{' '.join(text.replace(chr(9), ' ').split())}\t{label}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _write_tsv(path: pathlib.Path, rows: list[tuple[str, str, int]]) -> None:
    lines = ["index\tsentence1\tsentence2\tlabel"]
    for n, (s1, s2, label) in enumerate(rows):
        s1, s2 = (" ".join(s.replace("\t", " ").split()) for s in (s1, s2))
        lines.append(f"{n}\t{s1}\t{s2}\t{label}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python-doc-deb", type=pathlib.Path, required=True)
    parser.add_argument("--wordnet-deb", type=pathlib.Path, required=True)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("m2jax/data/assets"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        pydoc = _unpack(args.python_doc_deb, tmp / "pydoc")
        wordnet = _unpack(args.wordnet_deb, tmp / "wordnet")
        html_root = pydoc / "usr/share/doc/python3.11/html"
        docs = make_corpus(html_root)
        raw = io.BytesIO()
        # mtime=0 keeps the gzip bytes reproducible.
        with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=9) as gz:
            for doc in docs:
                gz.write((json.dumps(doc, ensure_ascii=False) + "\n").encode("utf-8"))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "python_docs_corpus.jsonl.gz").write_bytes(raw.getvalue())
        # The packages' copyright files carry the full licence texts the licences ask us to ship.
        py_copyright = (pydoc / "usr/share/doc/python3.11-doc/copyright").read_text(encoding="utf-8")
        (args.out / "LICENSE-python-docs.txt").write_text(py_copyright, encoding="utf-8")
        wn_copyright = (wordnet / "usr/share/doc/wordnet-base/copyright").read_text(encoding="utf-8")
        (args.out / "LICENSE-wordnet.txt").write_text(wn_copyright, encoding="utf-8")
        task = make_sense_task(wordnet / "usr/share/wordnet")
        (args.out / "WNSENSE").mkdir(exist_ok=True)
        _write_tsv(args.out / "WNSENSE/train.tsv", task["train"])
        _write_tsv(args.out / "WNSENSE/dev.tsv", task["dev"])
        pos_task = make_pos_task(wordnet / "usr/share/wordnet")
        (args.out / "WNPOS").mkdir(exist_ok=True)
        _write_single_tsv(args.out / "WNPOS/train.tsv", pos_task["train"])
        _write_single_tsv(args.out / "WNPOS/dev.tsv", pos_task["dev"])
        n_chars = sum(len(d["text"]) for d in docs)
        print(f"corpus: {len(docs)} documents, {n_chars} characters, "
              f"{len(raw.getvalue())} bytes compressed; WNSENSE: {len(task['train'])} train, "
              f"{len(task['dev'])} dev pairs; WNPOS: {len(pos_task['train'])} train, "
              f"{len(pos_task['dev'])} dev rows")


if __name__ == "__main__":
    main()
