"""Continual pre-training (scenario: pretrain): corpus reading and packing, perplexity, metrics, the loop."""

import json
import math
import random
from pathlib import Path

import pytest
import torch

from migu.config import load_config
from migu.data.corpus import (Block, DomainSpec, encode_blocks, load_domains, pack, pack_documents, passage_key,
                              read_corpus)
from migu.data.records import DataError
from migu.metrics import average_perplexity, general_drift, perplexity_forgetting, summarize_perplexity
from migu.perplexity import perplexity
from migu.train import run

# ------------------------------------------------------------------------------------------ perplexity
def test_perplexity_is_exp_of_the_token_mean_nll(tiny_llama):
    model, tok = tiny_llama
    g = torch.Generator().manual_seed(0)
    blocks = [torch.randint(4, 200, (n,), generator=g).tolist() for n in (12, 5, 9, 2)]
    total, count, per_block = 0.0, 0, []
    with torch.no_grad():
        for ids in blocks:  # by hand: one block at a time, no padding, position t-1 predicts token t
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
            nll = -sum(float(logp[t - 1, ids[t]]) for t in range(1, len(ids)))
            total, count = total + nll, count + len(ids) - 1
            per_block.append(math.exp(nll / (len(ids) - 1)))
    result = perplexity(model, encode_blocks([Block(b) for b in blocks]), batch_size=3,
                        pad_token_id=tok.pad_token_id)
    assert result.tokens == count == 11 + 4 + 8 + 1 and result.items == 4
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)
    assert result.nll == pytest.approx(total / count, rel=1e-5)
    assert result.perplexity != pytest.approx(sum(per_block) / len(per_block), rel=1e-4)  # token-weighted
    assert model.training  # the model's mode is restored (tiny_model returns it in train mode)


# ------------------------------------------------------------------------------------------ packing
def _doc_of_positions(docs, eos, bos=()):
    """For the concatenated stream bos+doc+eos..., the document index of each position."""
    owner = []
    for i, d in enumerate(docs):
        owner += [i] * (len(bos) + len(d) + 1)
    return owner


@pytest.mark.parametrize("block_size", [2, 5, 16])
def test_packing_keeps_every_token_in_order_and_separates_documents_with_eos(block_size):
    rng = random.Random(block_size)
    eos = 1
    docs = [[rng.randrange(3, 50) for _ in range(rng.randrange(1, 14))] for _ in range(20)]
    blocks = pack(docs, block_size, eos)
    stream = [t for d in docs for t in d + [eos]]
    flat = [t for b in blocks for t in b]
    assert flat == stream or (flat == stream[:-1] and len(stream) % block_size == 1)  # a lone final eos is dropped
    assert all(len(b) == block_size for b in blocks[:-1]) and 2 <= len(blocks[-1]) <= block_size
    owner = _doc_of_positions(docs, eos)
    pos = 0
    for b in blocks:
        for k in range(len(b) - 1):  # inside a block, a document boundary always follows an eos
            if owner[pos + k] != owner[pos + k + 1]:
                assert b[k] == eos
        pos += len(b)


def test_packing_with_a_budget_and_bos():
    docs = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    blocks = pack(docs, 4, 1, bos=[2], max_blocks=2)
    assert blocks == [[2, 5, 6, 7], [1, 2, 8, 9]]
    assert pack(docs, 4, 1, bos=[2]) == [[2, 5, 6, 7], [1, 2, 8, 9], [1, 2, 10, 11], [12, 13, 1, 2], [14, 1]]
    assert pack([[5, 6, 7]], 4, 1) == [[5, 6, 7, 1]]
    assert pack([[5, 6, 7, 8]], 4, 1) == [[5, 6, 7, 8]]  # the lone final eos predicts nothing: dropped


def test_pack_documents_tokenises_lazily_and_round_trips(tiny_llama):
    _, tok = tiny_llama
    docs = [f"document number {i} says hello" for i in range(200)]
    blocks = pack_documents(tok, docs, block_size=16, max_blocks=3, chunk=8)
    assert len(blocks) == 3 and all(len(b.input_ids) == 16 for b in blocks)
    text = tok.decode([t for b in blocks for t in b.input_ids])
    assert text.startswith("document number 0 says hello<|endoftext|>document number 1")
    items = encode_blocks(blocks)
    assert items[0]["labels"] == items[0]["input_ids"] == blocks[0].input_ids


# ------------------------------------------------------------------------------------------ bad files
def _one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("name, content, expected", [
    ("bad.jsonl", '{"text": "fine"}\n{"text": broken\n', "line 2: invalid JSON"),
    ("nofield.jsonl", '{"text": "fine"}\n\n{"body": "x"}\n', "line 3: missing field 'text'"),
    ("notstr.jsonl", '{"text": 5}\n', "line 1: field 'text' must be a string"),
    ("notobj.jsonl", '["a"]\n', "line 1: expected an object with field 'text'"),
    ("nofield.json", '[{"text": "a"}, {"txt": "b"}]', "record 1: missing field 'text'"),
    ("empty.txt", "\n  \n\n", "no documents (empty corpus)"),
    ("empty.jsonl", "", "no documents (empty corpus)"),
    ("blank_texts.jsonl", '{"text": "  "}\n', "no documents (empty corpus)"),
    ("corpus.csv", "text\nx\n", "unsupported corpus file type"),
])
def test_bad_corpus_files_get_a_one_line_error_naming_file_and_line(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as err:
        read_corpus(path)
    message = _one_line(err)
    assert str(path) in message and expected in message


def test_missing_corpus_file_and_unknown_task(tmp_path):
    with pytest.raises(DataError) as err:
        load_domains([DomainSpec("d", [str(tmp_path / "nope.txt")])])
    assert _one_line(err) == f"{tmp_path / 'nope.txt'}: file not found"
    with pytest.raises(DataError, match="unknown task 'nosuchtask'"):
        load_domains([DomainSpec("d", ["nosuchtask"])], data_dir=tmp_path)


def test_txt_documents_and_seeded_disjoint_heldout_split(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("\n\n".join(f"doc {i} line one\ndoc {i} line two" for i in range(20)) + "\n\n\ndoc 0 line one\n"
                    "doc 0 line two\n")  # a duplicate of document 0
    docs = read_corpus(path)
    assert len(docs) == 21 and docs[0] == "doc 0 line one\ndoc 0 line two"
    a = load_domains([DomainSpec("d", [str(path)])], heldout_fraction=0.2, seed=3)[0]
    b = load_domains([DomainSpec("d", [str(path)])], heldout_fraction=0.2, seed=3)[0]
    assert (a.train, a.heldout) == (b.train, b.heldout)  # seeded
    assert len(a.heldout) == 4 and len(a.train) == 16 and not set(a.train) & set(a.heldout)
    assert set(a.train) | set(a.heldout) == set(docs)


def test_default_qa_domain_never_shares_a_passage_between_train_and_heldout():
    from migu.data.benchmark import default_data_dir

    try:
        default_data_dir()
    except DataError:
        pytest.skip("CL_Benchmark data not available")
    (qa,) = load_domains([DomainSpec("qa", ["BoolQA", "MultiRC"])], seed=0)
    train_keys = {passage_key(d) for d in qa.train}
    assert qa.heldout and not any(passage_key(d) in train_keys for d in qa.heldout)
    assert len({passage_key(d) for d in qa.train}) == len(qa.train)  # one record per passage
    assert qa.train[0].startswith("question:") and qa.train[1].startswith("paragraph:")  # interleaved sources


# ------------------------------------------------------------------------------------------ metrics
P = [  # rows: after domain 0, 1, 2; columns: domains 0, 1, 2, general
    [10.0, 30.0, 40.0, 20.0],
    [12.0, 15.0, 35.0, 21.0],
    [14.0, 18.0, 16.0, 22.0],
]
P0 = [30.0, 35.0, 45.0, 19.0]


def test_perplexity_metrics_on_a_hand_made_matrix():
    assert average_perplexity(P) == pytest.approx((14 + 18 + 16) / 3)
    # forgetting: domain 0 rose 14 - min(10, 12) = 4, domain 1 rose 18 - 15 = 3
    assert perplexity_forgetting(P) == pytest.approx(3.5)
    assert perplexity_forgetting(P, relative=True) == pytest.approx((4 / 10 + 3 / 15) / 2)
    assert general_drift(P, P0) == (pytest.approx(3.0), pytest.approx(3 / 19))
    m = summarize_perplexity(P, P0, mtl=False)
    assert m["ppl_diagonal"] == [10.0, 15.0, 16.0] and m["ppl_final_row"] == [14.0, 18.0, 16.0]
    assert m["ppl_general"] == 22.0 and m["ppl_general0"] == 19.0
    # the best value can come after the domain was trained (later domains helped it)
    # (no general column here): domain 0 rose 9 - min(10, 8) = 1, domain 1 rose 8 - 7 = 1
    assert perplexity_forgetting([[10, 9, 9], [8, 7, 9], [9, 8, 6]], general=False) == pytest.approx(1.0)


def test_perplexity_metrics_of_unfinished_single_and_mtl_matrices():
    m = summarize_perplexity(P[:2], P0, mtl=False)  # two of three domains trained
    assert m["ppl_avg"] == pytest.approx(13.5) and m["ppl_forgetting"] == pytest.approx(2.0)
    assert m["ppl_general_drift"] == pytest.approx(2.0)
    one = summarize_perplexity(P[:1], P0, mtl=False)
    assert one["ppl_avg"] == 10.0 and one["ppl_forgetting"] is None and one["ppl_general_drift"] == pytest.approx(1.0)
    mtl = summarize_perplexity([[11.0, 12.0, 13.0, 25.0]], P0, mtl=True)
    assert mtl["ppl_avg"] == pytest.approx(12.0) and mtl["ppl_forgetting"] is None and mtl["ppl_diagonal"] is None
    assert mtl["ppl_general_drift"] == pytest.approx(6.0)
    assert summarize_perplexity(P, None, mtl=False)["ppl_general_drift"] is None


# ------------------------------------------------------------------------------------------ the loop
WORDS = {"colors": "red blue green pink gray", "animals": "cat dog cow hen pig", "moods": "glad calm sad mad shy"}


def _corpora(root: Path) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    paths = {}
    for name, words in WORDS.items():
        docs = [" ".join(rng.choice(words.split()) for _ in range(rng.randrange(4, 12))) for _ in range(60)]
        if name == "animals":  # one JSONL domain
            (root / f"{name}.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
            paths[name] = root / f"{name}.jsonl"
        else:
            (root / f"{name}.txt").write_text("\n\n".join(docs) + "\n")
            paths[name] = root / f"{name}.txt"
    general = [" ".join(rng.choice("the sun is a star and water is wet".split()) for _ in range(8)) for _ in range(20)]
    (root / "general.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in general))
    paths["general"] = root / "general.jsonl"
    return paths


def _pretrain_config(model_dir, paths, out, *extra):
    domains = "[" + ", ".join(
        f"{{name: {n}, train: ['{paths[n]}']" + (", text_field: body}" if n == "animals" else "}")
        for n in WORDS) + "]"
    sets = ["scenario=pretrain", f"model.name={model_dir}", f"pretrain.domains={domains}",
            f"pretrain.general={paths['general']}", "pretrain.block_size=32", "pretrain.train_blocks_per_domain=8",
            "pretrain.heldout_blocks_per_domain=3", "pretrain.general_blocks=3", "pretrain.heldout_fraction=0.2",
            "train.batch_size=4", "train.lr=3e-3", "eval.batch_size=4", "threads=1", f"output_dir={out}"]
    return load_config(None, sets + list(extra))


def _matrix(out: Path) -> list[list[str]]:
    return [line.split(",") for line in (out / "perplexity_matrix.csv").read_text().splitlines()]


@pytest.mark.parametrize("extra", [(), ("method.name=seq-lora", "migu.enabled=true", "train.lr=1e-2"),
                                   ("method.name=replay", "migu.enabled=true", "method.replay.mix=batch",
                                    "method.replay.buffer_size=4")],
                         ids=["seq-ft", "seq-lora+migu", "replay+migu"])
def test_pretrain_run_writes_a_perplexity_matrix(tmp_path, tiny_llama_dir, extra):
    paths, out = _corpora(tmp_path / "corpora"), tmp_path / "run"
    summary = run(_pretrain_config(tiny_llama_dir, paths, out, *extra), quiet=True)
    rows = _matrix(out)
    assert rows[0] == ["after_task", "colors", "animals", "moods", "general"]
    assert [r[0] for r in rows[1:]] == ["untrained", "colors", "animals", "moods"]
    values = [float(x) for r in rows[1:] for x in r[1:]]
    assert len(values) == 4 * 4 and all(math.isfinite(v) and v > 1 for v in values)
    assert not (out / "accuracy_matrix.csv").exists()
    assert summary["scenario"] == "pretrain" and summary["tasks"][-1] == "general"
    assert summary["blocks"]["colors"] == {"train": 8, "heldout": 3} and summary["blocks"]["general"] == {"heldout": 3}
    for key in ("ppl_avg", "ppl_forgetting", "ppl_general_drift", "ppl_general_drift_rel"):
        assert isinstance(summary[key], float) and math.isfinite(summary[key])
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    assert len([r for r in train if r["stage"] == 0]) == 2  # 8 blocks / batch 4
    assert all(r["tokens"] >= 4 * 32 for r in train) and train[0]["tokens"] == 4 * 32  # every token is trained
    evals = [r for r in records if r["type"] == "eval"]
    assert len(evals) == 4 * 4 and all(r["tokens"] == 3 * 31 and r["perplexity"] > 1 for r in evals)
    if extra:
        assert any("migu_kept" in r for r in train)
    # learning: the first domain's perplexity falls once it is trained
    assert float(rows[2][1]) < float(rows[1][1])


def test_pretrain_bad_domain_fails_before_the_run_directory_exists(tmp_path, tiny_llama_dir):
    paths = _corpora(tmp_path / "corpora")
    bad = tmp_path / "corpora" / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    cfg = _pretrain_config(tiny_llama_dir, paths, tmp_path / "run", f"pretrain.domains=[{{name: x, train: ['{bad}']}}]")
    with pytest.raises(DataError, match=r"bad.jsonl: line 2: missing field 'text'"):
        run(cfg, quiet=True)
    assert not (tmp_path / "run").exists()
    cfg = _pretrain_config(tiny_llama_dir, paths, tmp_path / "run", f"pretrain.general={paths['colors']}")
    with pytest.raises(DataError, match="never be trained on"):
        run(cfg, quiet=True)


def test_pretrain_resume_matches_the_uninterrupted_run(tmp_path, tiny_llama_dir, monkeypatch):
    paths = _corpora(tmp_path / "corpora")
    ref = tmp_path / "ref"
    run(_pretrain_config(tiny_llama_dir, paths, ref), quiet=True)

    from migu.methods.seq_ft import SeqFT

    calls = {"n": 0}

    def crash(self, step):
        calls["n"] += 1
        if calls["n"] == 3:  # second domain, first step
            raise KeyboardInterrupt

    monkeypatch.setattr(SeqFT, "after_step", crash)
    out = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        run(_pretrain_config(tiny_llama_dir, paths, out), quiet=True)
    monkeypatch.undo()
    run(_pretrain_config(tiny_llama_dir, paths, out), resume=True, quiet=True)
    assert _matrix(out) == _matrix(ref)


def test_report_and_text_output_of_a_pretrain_run(tmp_path, tiny_llama_dir):
    from migu.report.plots import write_run_plots
    from migu.report.rundata import load_run
    from migu.report.tables import run_report_markdown, run_summary_text
    from migu.compare import format_matrix

    paths, out = _corpora(tmp_path / "corpora"), tmp_path / "run"
    summary = run(_pretrain_config(tiny_llama_dir, paths, out, "pretrain.train_blocks_per_domain=4"), quiet=True)
    assert format_matrix(summary).splitlines()[0].split() == ["perplexity", "colors", "animals", "moods", "general"]
    assert "avg ppl" in format_matrix(summary)
    written = write_run_plots(out)
    assert {p.name for p in written} >= {"perplexity_matrix.png", "perplexity_curves.png", "train_loss.png"}
    r = load_run(out)
    assert r.is_perplexity and r.tasks[-1] == "general" and len(r.matrix) == 4
    assert r.metrics["ppl_avg"] == pytest.approx(summary["ppl_avg"])
    md = run_report_markdown(r, written)
    assert "Perplexity matrix" in md and "lower is better" in md and "avg ppl" in md
    assert "perplexity" in run_summary_text(r)
    from migu.report.tables import write_compare

    result = write_compare([r], tmp_path / "compare")
    assert "avg ppl" in result["text"] and "general drift" in result["markdown"]
    from migu.magnitudes import run_magnitudes

    files = run_magnitudes(out, n=2, batch_size=2, progress=False)  # per-domain MIGU magnitudes of blocks
    assert {"colors.pt", "animals.pt", "moods.pt"} <= {f.name for f in files}
