"""Unlabelled text corpora for continual pre-training (`scenario: pretrain`): reading, splitting, packing.

    domains = load_domains(None, data_dir=None, seed=0)          # the default stream news → reviews → qa
    blocks = pack_documents(tokenizer, domains[0].train, block_size=128, max_blocks=24)

Sources. A domain reads one or more sources, each one of
    - a plain `.txt` file: documents separated by one or more blank lines (lines inside a document are
      kept with their newlines);
    - a `.jsonl` file (one JSON object a line) or a `.json` file (a JSON array of objects): the document is
      the string in the record's text field (`text` unless configured); records whose text is empty or
      only whitespace are skipped;
    - a CL_Benchmark task name (`agnews`, or `task:agnews`): the `sentence` of each record of its
      train.json (training) and test.json (held out), the label dropped.
A source ending in `.txt`, `.jsonl` or `.json` is a file; anything else is a task name.

Held-out documents. A task source's held-out documents come from its test split. A domain that lists
`heldout` sources takes its held-out documents from them (and all of `train` for training); otherwise
a file source gives a seeded `heldout_fraction` of its documents (at least one) to the held-out side.
Train and held-out never share a document: identical texts are removed from the held-out side, and for
CL_Benchmark question-answering records, which repeat one passage with many questions (MultiRC: 255 of
the 272 passages of its test split also occur in its train split; BoolQA: 224), the *passage* is the
unit: a held-out record whose passage occurs in the training side is dropped, and within each side only
the first record of each passage is kept.

Order and subsampling. The documents of each source are shuffled with a seeded RNG
(`task_rng(seed, "<domain>/<source>", "pretrain-<split>")`), then the sources of a domain are interleaved
round-robin (one document of each in turn, until each runs out), so every source contributes
equally to a budget of blocks. `pack_documents` tokenises documents in that order only until the
budget is filled, so a small budget never tokenises a whole corpus.

Packing. Each document becomes `[bos] + tokens + [eos]` (the bos only for tokenizers that add one by
default, as `migu.data.encode` does; SmolLM2 adds none), the documents are concatenated and cut into
blocks of `block_size` tokens. A block therefore spans two documents only with an eos between them.
The last block may be shorter (it is dropped only when it holds a single token, which predicts
nothing); with a block budget, exactly `max_blocks` full blocks are cut (the document that fills the
last one is cut there) unless the documents run out first. Attention is not masked between the
documents of a block (the usual packing of pre-training).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from migu.data.benchmark import _find_task, _root
from migu.data.collate import _bos
from migu.data.records import DataError, _read_text, load_json, task_rng

FILE_SUFFIXES = (".txt", ".jsonl", ".json")
TASK_PREFIX = "task:"
SENTENCE_FIELD = "sentence"  # CL_Benchmark records: {"label": ..., "sentence": ...}
GENERAL_FILE = Path(__file__).resolve().parent.parent / "assets" / "general_samples.jsonl"

# The default stream: three domains of the shipped CL_Benchmark data, labels dropped.
DEFAULT_DOMAINS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("news", ("agnews", "dbpedia")),           # news headlines + articles, encyclopedia abstracts
    ("reviews", ("amazon", "yelp", "IMDB")),   # product, business and film reviews
    ("qa", ("BoolQA", "MultiRC")),              # Wikipedia passages + questions, paragraphs + Q/A
)


@dataclass
class Block:
    """One packed block of token ids; trained with the causal-LM loss on every token (labels = input_ids)."""

    input_ids: list[int]


@dataclass
class DomainSpec:
    """A domain as configured: its name, training sources, optional held-out sources, JSON text field."""

    name: str
    train: list[str]
    heldout: list[str] | None = None
    text_field: str | None = None


@dataclass
class Domain:
    """A domain's documents, ordered (shuffled per source, sources interleaved) and deduplicated."""

    name: str
    train: list[str]
    heldout: list[str]
    sources: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ reading
def is_file_source(source: str) -> bool:
    """True for a path ending in .txt/.jsonl/.json; False for a CL_Benchmark task name."""
    return str(source).lower().endswith(FILE_SUFFIXES)


def read_corpus(path: str | Path, text_field: str = "text") -> list[str]:
    """The documents of a .txt, .jsonl or .json corpus file, in file order.

    Raises:
        DataError: a missing or unreadable file, an unsupported extension, a line (JSONL) or record
            (JSON) that is not valid JSON or not an object, a missing or non-string text field (the
            message names the file, the line or record and the field), or no document at all.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise DataError(f"{path}: unsupported corpus file type {suffix!r}; use .txt (documents separated by "
                        f"blank lines), .jsonl or .json (records with a {text_field!r} field)")
    if suffix == ".txt":
        docs = _split_paragraphs(_read_text(path))
    elif suffix == ".jsonl":
        docs = []
        for lineno, line in enumerate(_read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {lineno}: invalid JSON at column {e.colno}: {e.msg}") from None
            text = _text_of(record, text_field, f"{path}: line {lineno}")
            if text.strip():
                docs.append(text)
    else:
        records = load_json(path)
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON array of records, got a JSON {type(records).__name__}")
        docs = [t for i, r in enumerate(records) if (t := _text_of(r, text_field, f"{path}: record {i}")).strip()]
    if not docs:
        raise DataError(f"{path}: no documents (empty corpus)")
    return docs


def read_task_sentences(data_dir: str | Path | None, task: str, split: str) -> list[str]:
    """The `sentence` of every record of a CL_Benchmark task's split ("train" or "test"), labels dropped."""
    root = _root(data_dir)
    name, category = _find_task(root, task)
    path = root / category / name / f"{split}.json"
    records = load_json(path)
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON array of records, got a JSON {type(records).__name__}")
    docs = [t for i, r in enumerate(records) if (t := _text_of(r, SENTENCE_FIELD, f"{path}: record {i}")).strip()]
    if not docs:
        raise DataError(f"{path}: no records (empty split)")
    return docs


def _text_of(record, text_field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object with field {text_field!r}, got {type(record).__name__}")
    if text_field not in record or record[text_field] is None:
        raise DataError(f"{where}: missing field {text_field!r} (fields present: {sorted(map(str, record))})")
    text = record[text_field]
    if not isinstance(text, str):
        raise DataError(f"{where}: field {text_field!r} must be a string, got {type(text).__name__}")
    return text


def _split_paragraphs(text: str) -> list[str]:
    docs, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line.rstrip())
        elif current:
            docs.append("\n".join(current))
            current = []
    if current:
        docs.append("\n".join(current))
    return docs


def passage_key(text: str) -> str:
    """The unit of deduplication: a QA record's passage (CL_Benchmark BoolQA/MultiRC), else the text.

    BoolQA sentences are `question: ...\\npassage: <passage>`; MultiRC sentences are
    `paragraph: <paragraph>\\nquestion: ...\\ncandidate answer: ...`.
    """
    if "\npassage:" in text:
        return text.split("\npassage:", 1)[1].strip()
    if text.startswith("paragraph:") and "\nquestion:" in text:
        return text.split("\nquestion:", 1)[0].strip()
    return text.strip()


def _dedupe(docs: Iterable[str], exclude: set[str] = frozenset()) -> list[str]:
    seen, out = set(exclude), []
    for doc in docs:
        key = passage_key(doc)
        if key not in seen:
            seen.add(key)
            out.append(doc)
    return out


# ------------------------------------------------------------------------------------------ domains
def default_domains() -> list[DomainSpec]:
    """The default stream news (agnews + dbpedia) → reviews (amazon + yelp + IMDB) → qa (BoolQA + MultiRC)."""
    return [DomainSpec(name, list(sources)) for name, sources in DEFAULT_DOMAINS]


def load_domains(specs: Sequence[DomainSpec] | None, data_dir: str | Path | None = None, text_field: str = "text",
                 heldout_fraction: float = 0.1, seed: int = 0) -> list[Domain]:
    """Reads, splits, deduplicates and orders the documents of every domain (see the module docstring).

    Args:
        specs: the domains in training order; None: `default_domains()`.
        data_dir: the CL_Benchmark directory for task sources (None: `default_data_dir()`).
        text_field: the JSON text field of file sources (a spec's own `text_field` wins).
        heldout_fraction: share of a file source's documents held out when its domain lists no `heldout`.
        seed: seed of the per-source shuffles and of the held-out split of file sources.

    Raises:
        DataError: a bad source (file, line/record, field), an empty domain, or a domain without
            held-out documents.
    """
    specs = default_domains() if specs is None else list(specs)
    names = [s.name for s in specs]
    for name in names:
        if names.count(name) > 1:
            raise DataError(f"pretrain.domains: domain {name!r} is listed twice")
    return [_load_domain(s, data_dir, s.text_field or text_field, heldout_fraction, seed) for s in specs]


def _load_domain(spec: DomainSpec, data_dir, text_field: str, heldout_fraction: float, seed: int) -> Domain:
    where = f"pretrain.domains[{spec.name}]"
    if not spec.train:
        raise DataError(f"{where}.train: lists no source")
    train_parts: list[tuple[str, list[str]]] = []
    heldout_parts: list[tuple[str, list[str]]] = []
    for source in spec.train:
        if is_file_source(source):
            docs = _dedupe(read_corpus(source, text_field))
            if spec.heldout is None:
                rng = task_rng(seed, f"{spec.name}/{source}", "pretrain-split")
                order = list(range(len(docs)))
                rng.shuffle(order)
                k = max(1, round(heldout_fraction * len(docs)))
                if len(docs) - k < 1:
                    raise DataError(f"{source}: {len(docs)} document(s): too few to hold out {k} and train on the "
                                    f"rest; add documents or give the domain `heldout` sources")
                held = set(order[:k])
                heldout_parts.append((source, [d for i, d in enumerate(docs) if i in held]))
                docs = [d for i, d in enumerate(docs) if i not in held]
            train_parts.append((source, docs))
        else:
            task = source[len(TASK_PREFIX):] if source.startswith(TASK_PREFIX) else source
            train_parts.append((source, _dedupe(read_task_sentences(data_dir, task, "train"))))
            if spec.heldout is None:
                heldout_parts.append((source, _dedupe(read_task_sentences(data_dir, task, "test"))))
    for source in spec.heldout or []:
        if is_file_source(source):
            heldout_parts.append((source, _dedupe(read_corpus(source, text_field))))
        else:
            task = source[len(TASK_PREFIX):] if source.startswith(TASK_PREFIX) else source
            heldout_parts.append((source, _dedupe(read_task_sentences(data_dir, task, "test"))))
    train_keys = {passage_key(d) for _, docs in train_parts for d in docs}
    heldout_parts = [(s, _dedupe(docs, exclude=train_keys)) for s, docs in heldout_parts]
    train = _interleave(spec.name, train_parts, seed, "pretrain-train")
    heldout = _interleave(spec.name, heldout_parts, seed, "pretrain-heldout")
    if not heldout:
        raise DataError(f"{where}: no held-out documents left (every held-out document also occurs in training)")
    return Domain(spec.name, train, heldout, list(spec.train))


def _interleave(domain: str, parts: list[tuple[str, list[str]]], seed: int, purpose: str) -> list[str]:
    """Each source's documents shuffled (seeded), then taken round-robin across the sources."""
    shuffled = []
    for source, docs in parts:
        docs = list(docs)
        task_rng(seed, f"{domain}/{source}", purpose).shuffle(docs)
        shuffled.append(docs)
    out = []
    for i in range(max((len(d) for d in shuffled), default=0)):
        out += [docs[i] for docs in shuffled if i < len(docs)]
    return out


def load_general(path: str | Path | None = None, text_field: str = "text") -> list[str]:
    """The general held-out documents (file order): `path`, or migu's bundled general passages."""
    return read_corpus(GENERAL_FILE if path is None else path, text_field)


# ------------------------------------------------------------------------------------------ packing
def pack(token_lists: Iterable[Sequence[int]], block_size: int, eos_id: int, bos: Sequence[int] = (),
         max_blocks: int | None = None) -> list[list[int]]:
    """Concatenate `bos + tokens + [eos]` of each document and cut the stream into blocks.

    Args:
        token_lists: each document's token ids (without special tokens); consumed lazily.
        block_size: tokens per block (>= 2).
        eos_id: the id written after every document.
        bos: ids written before every document (usually none).
        max_blocks: stop after this many full blocks (None or 0: pack everything; the last block may be
            shorter, and is dropped only when it holds a single token).

    Returns:
        The blocks, lists of ids; their concatenation is a prefix of the documents' concatenation (all of
        it without `max_blocks`, except a final single-token tail).
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    blocks: list[list[int]] = []
    current: list[int] = []
    for ids in token_lists:
        stream = list(bos) + list(ids) + [eos_id]
        while stream:
            take = block_size - len(current)
            current += stream[:take]
            stream = stream[take:]
            if len(current) == block_size:
                blocks.append(current)
                current = []
                if max_blocks and len(blocks) >= max_blocks:
                    return blocks
    if len(current) >= 2:
        blocks.append(current)
    return blocks


def pack_documents(tokenizer, docs: Sequence[str], block_size: int, max_blocks: int | None = None,
                   chunk: int = 64) -> list[Block]:
    """Tokenise `docs` in order (in chunks, only as many as the budget needs) and `pack` them into Blocks.

    Raises:
        ValueError: the tokenizer has no eos token.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; packing needs one between documents")

    def token_lists():
        for start in range(0, len(docs), chunk):
            yield from tokenizer(list(docs[start:start + chunk]), add_special_tokens=False)["input_ids"]

    return [Block(ids) for ids in pack(token_lists(), block_size, eos, _bos(tokenizer), max_blocks)]


def encode_blocks(blocks: Sequence[Block]) -> list[dict]:
    """Training/evaluation items of blocks: `input_ids` and `labels` (= input_ids: every token is trained)."""
    return [{"input_ids": list(b.input_ids), "labels": list(b.input_ids)} for b in blocks]
