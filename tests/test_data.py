"""Tests for migu.data: prompts, the CL_Benchmark reader, custom streams, subsampling, encoding,
batching and padding. Everything runs on tiny files built in tmp_path and a word-level tokenizer
built in memory (nothing is downloaded)."""

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from migu.data import (IGNORE_INDEX, DataError, Example, build_prompt, collate, default_data_dir, encode,
                       encode_prompts, length_grouped_batches, list_tasks, load_benchmark_stream,
                       load_benchmark_task, load_custom_stream, resolve_order, stratified_indices, subsample,
                       task_rng)
from migu.data import benchmark as benchmark_module

TC_INSTRUCTION = "What is the topic of the following paragraph? Choose one from the option.\n"
REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "CL_Benchmark"


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def records(counts: dict, prefix: str = "text") -> list[dict]:
    return [{"label": label, "sentence": f"{prefix} {label} {i}"} for label, n in counts.items() for i in range(n)]


@pytest.fixture
def bench(tmp_path) -> Path:
    """A miniature CL_Benchmark: agnews (TC, with instruction) and COPA (no instruction)."""
    root = tmp_path / "CL_Benchmark"
    write_json(root / "instruction_config.json",
               {"TC": [{"instruction_type": "zero-shot", "instruction": TC_INSTRUCTION}]})
    write_json(root / "orders.json", {"standard": {"1": ["agnews", "COPA"], "2": ["COPA", "agnews"]},
                                      "long": {"4": ["COPA"]}})
    write_json(root / "TC/agnews/labels.json", ["World", "Sports"])
    write_json(root / "TC/agnews/train.json", records({"World": 60, "Sports": 20}))
    write_json(root / "TC/agnews/test.json", records({"World": 10, "Sports": 10}, "test"))
    write_json(root / "COPA/COPA/labels.json", ["A", "B"])
    copa = [{"label": "A", "sentence": "Which is the cause?\nA: rain.\nB: sun."}] * 3
    write_json(root / "COPA/COPA/train.json", copa)
    write_json(root / "COPA/COPA/test.json", copa)
    return root


# ---------------------------------------------------------------- prompts and the benchmark reader

def test_tc_prompt_is_the_published_format(bench):
    expected = ("Task:TC\nDataset:agnews\nWhat is the topic of the following paragraph? Choose one from the option.\n"
                "Option: World, Sports \nHello there\nAnswer:")
    assert build_prompt("Hello there", "agnews", "TC", TC_INSTRUCTION, ["World", "Sports"]) == expected
    task = load_benchmark_task(bench, "agnews")
    assert task.train[0] == Example(expected.replace("Hello there", "text World 0"), "World")
    assert (task.name, task.category, task.labels) == ("agnews", "TC", ["World", "Sports"])
    assert (len(task.train), len(task.test)) == (80, 20)


def test_copa_prompt_has_no_instruction_and_no_options(bench):
    task = load_benchmark_task(bench, "copa")  # case-insensitive lookup
    assert task.name == "COPA"
    assert task.train[0].prompt == "Task:COPA\nDataset:COPA\nWhich is the cause?\nA: rain.\nB: sun.\nAnswer:"
    assert task.train[0].target == "A"


def test_custom_instruction_gets_its_newline():
    assert build_prompt("s", "t", instruction="Classify.", options=["a", "b"]) == \
        "Task:t\nDataset:t\nClassify.\nOption: a, b \ns\nAnswer:"


def test_resolve_order_and_bad_combinations(bench):
    assert resolve_order(bench, "standard", 2) == ["COPA", "agnews"]
    assert resolve_order(bench, "long", "4") == ["COPA"]
    with pytest.raises(DataError, match=r"no order 4 \(order 4 belongs to benchmark 'long'\).*standard: orders 1, 2"):
        resolve_order(bench, "standard", 4)
    with pytest.raises(DataError, match="unknown benchmark 'medium'.*long: orders 4"):
        resolve_order(bench, "medium", 1)
    write_json(bench / "orders.json", {"standard": {"1": ["agnews", "ghost"]}})
    with pytest.raises(DataError, match="orders.json: standard order 1 names task 'ghost'"):
        resolve_order(bench, "standard", 1)


def test_stream_loads_tasks_in_order(bench):
    assert [t.name for t in load_benchmark_stream(bench, "standard", 1, 4, 2, seed=0)] == ["agnews", "COPA"]


def test_default_data_dir(tmp_path, monkeypatch, bench):
    monkeypatch.setenv("MIGU_DATA_DIR", str(bench))
    assert default_data_dir() == bench
    assert list_tasks(None) == {"COPA": "COPA", "agnews": "TC"}
    monkeypatch.setenv("MIGU_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="MIGU_DATA_DIR=.*nowhere is not a directory"):
        default_data_dir()
    monkeypatch.delenv("MIGU_DATA_DIR")
    monkeypatch.setattr(benchmark_module, "_REPO_DATA", tmp_path / "missing")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="set data.data_dir in the config or the MIGU_DATA_DIR"):
        default_data_dir()
    (tmp_path / "data" / "CL_Benchmark").mkdir(parents=True)
    assert default_data_dir() == Path("data/CL_Benchmark")


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="shared CL_Benchmark data not present")
def test_real_benchmark():
    assert resolve_order(REAL_DATA, "standard", 1) == ["dbpedia", "amazon", "yahoo", "agnews"]
    assert len(resolve_order(REAL_DATA, "long", 6)) == 15
    task = load_benchmark_task(REAL_DATA, "agnews", 20, 8, seed=0)
    assert task.train[0].prompt.startswith(
        "Task:TC\nDataset:agnews\n" + TC_INSTRUCTION + "Option: World, Sports, Business, Science or Technology \n")
    assert Counter(e.target for e in task.train) == {label: 5 for label in task.labels}
    mnli = load_benchmark_task(REAL_DATA, "MNLI", 0, 0, seed=0)  # the test split's "-" records are dropped
    assert "-" not in {e.target for e in mnli.test} and len(mnli.test) == 7600 - 131


# ---------------------------------------------------------------- subsampling

def test_subsampling_is_stratified_and_keeps_every_label():
    examples = [Example(f"p{i}", label) for label, n in {"a": 60, "b": 30, "c": 10}.items() for i in range(n)]
    assert Counter(e.target for e in subsample(examples, 10, task_rng(0, "t", "train"))) == {"a": 6, "b": 3, "c": 1}
    rare = [Example(f"p{i}", label) for label, n in {"a": 97, "b": 2, "c": 1}.items() for i in range(n)]
    assert Counter(e.target for e in subsample(rare, 5, task_rng(0, "t", "train"))) == {"a": 3, "b": 1, "c": 1}
    assert Counter(e.target for e in subsample(rare, 2, task_rng(0, "t", "train"))) == {"a": 1, "b": 1}
    assert subsample(examples, None, task_rng(0, "t", "x")) == examples
    assert subsample(examples, 0, task_rng(0, "t", "x")) == examples


def test_subsampling_is_deterministic_seed_sensitive_and_split_independent(bench):
    first = load_benchmark_task(bench, "agnews", 8, 4, seed=1)
    again = load_benchmark_task(bench, "agnews", 8, 4, seed=1)
    other = load_benchmark_task(bench, "agnews", 8, 4, seed=2)
    assert first == again
    assert first.train != other.train
    assert Counter(e.target for e in first.train) == {"World": 6, "Sports": 2}
    assert load_benchmark_task(bench, "agnews", 16, 4, seed=1).test == first.test


def test_rng_does_not_depend_on_pythons_hash():
    # Pinned values: a salted hash() would change them from one process to the next.
    assert stratified_indices(["a"] * 5 + ["b"] * 5, 4, task_rng(0, "agnews", "train")) == [1, 4, 5, 8]
    assert task_rng(3, "agnews", "train").randrange(10**6) == 543822


# ---------------------------------------------------------------- bad data

@pytest.mark.parametrize("content, pattern", [
    ('[{"label": "World", "sentence": "x"},', r"train\.json: invalid JSON at line 1, column 38"),
    ('[{"label": "World", "sentence": "x"}, {"sentence": "y"}]', r"train\.json: record 1: missing field 'label'"),
    ('[{"label": "World"}]', r"train\.json: record 0: missing field 'sentence'"),
    ('[{"label": "World", "sentence": "x"}, {"label": "Cats", "sentence": "y"}]',
     r"train\.json: record 1: field 'label': label 'Cats' is not one of the task's labels \(labels\.json\): "
     r"\['World', 'Sports'\]"),
    ("[]", r"train\.json: no records \(empty split\)"),
    ('{"label": "World"}', r"train\.json: expected a JSON array"),
])
def test_bad_benchmark_files(bench, content, pattern):
    (bench / "TC/agnews/train.json").write_text(content)
    with pytest.raises(DataError, match=pattern) as info:
        load_benchmark_task(bench, "agnews")
    assert "\n" not in str(info.value) and str(bench / "TC/agnews/train.json") in str(info.value)


def test_unknown_task_lists_known_ones(bench):
    with pytest.raises(DataError, match="unknown task 'imdb' in .*; known tasks: agnews, COPA"):
        load_benchmark_task(bench, "imdb")
    with pytest.raises(DataError, match="data directory .*nope does not exist"):
        load_benchmark_task(bench / "nope", "agnews")


# ---------------------------------------------------------------- custom streams

@pytest.fixture
def stream(tmp_path) -> Path:
    d = tmp_path / "stream"
    d.mkdir()
    (d / "reviews.jsonl").write_text("\n".join(json.dumps(r) for r in records({"pos": 16, "neg": 4})) + "\n\n")
    (d / "topics_train.csv").write_text(
        "text,topic\nball game,sport\nvote count,politics\ngoal,sport\nrain,weather\npainting,art\n")
    (d / "topics_test.csv").write_text("text,topic\nmatch,sport\n")
    write_json(d / "qa.json", [{"label": i % 2, "sentence": f"q{i}"} for i in range(10)])
    (d / "stream.yaml").write_text(
        "tasks:\n"
        "  - name: reviews\n    file: reviews.jsonl\n    test_fraction: 0.25\n    instruction: Sentiment?\n"
        "  - name: topics\n    train: topics_train.csv\n    test: topics_test.csv\n"
        "    text_field: text\n    label_field: topic\n    category: TC\n"
        "  - name: qa\n    file: qa.json\n    options: false\n")
    return d / "stream.yaml"


def test_custom_stream_reads_jsonl_csv_json(stream):
    reviews, topics, qa = load_custom_stream(stream, seed=0)
    assert reviews.labels == ["neg", "pos"] and (len(reviews.train), len(reviews.test)) == (15, 5)
    assert Counter(e.target for e in reviews.test) == {"pos": 4, "neg": 1}  # the split is stratified
    assert not {e.prompt for e in reviews.train} & {e.prompt for e in reviews.test}
    assert reviews.train[0].prompt.startswith("Task:reviews\nDataset:reviews\nSentiment?\nOption: neg, pos \ntext ")
    assert topics.labels == ["art", "politics", "sport", "weather"]
    head = "Task:TC\nDataset:topics\nOption: art, politics, sport, weather \n"
    assert topics.train[0] == Example(head + "ball game\nAnswer:", "sport")
    assert topics.test == [Example(head + "match\nAnswer:", "sport")]
    assert qa.labels == ["0", "1"] and qa.test[0].prompt.startswith("Task:qa\nDataset:qa\nq")
    assert "Option" not in qa.test[0].prompt
    assert load_custom_stream(stream, seed=0) == load_custom_stream(stream, seed=0)
    assert load_custom_stream(stream, seed=0)[0].test != load_custom_stream(stream, seed=5)[0].test
    assert [len(t.train) for t in load_custom_stream(stream, train_per_task=2, seed=0)] == [2, 2, 2]


@pytest.mark.parametrize("yaml_text, pattern", [
    ("name: x\n", r"stream\.yaml: missing key 'tasks'"),
    ("tasks:\n  - file: a.jsonl\n", r"stream\.yaml: tasks\[0\]: missing key 'name'"),
    ("tasks:\n  - name: t\n", r"stream\.yaml: tasks\[0\] \(t\): missing key 'train'"),
    ("tasks:\n  - name: t\n    train: topics_train.csv\n", r"stream\.yaml: tasks\[0\] \(t\): missing key 'test'"),
    ("tasks:\n  - name: t\n    file: a.jsonl\n    shuffle: true\n", r"tasks\[0\]: unknown key 'shuffle'"),
    ("tasks:\n  - name: t\n    file: missing.jsonl\n", r"missing\.jsonl: file not found"),
    ("tasks:\n  - name: t\n    file: topics_train.csv\n", r"topics_train\.csv: record 0: missing field 'sentence'"),
    ("tasks:\n  - name: t\n    file: bad.jsonl\n", r"bad\.jsonl: line 2: invalid JSON"),
    ("tasks:\n  - name: t\n    file: reviews.jsonl\n    labels: [pos]\n",
     r"reviews\.jsonl: record 16: field 'label': label 'neg' is not one of the task's labels"),
    ("tasks:\n  - name: t\n    train: topics_train.csv\n    test: topics_bad.csv\n    text_field: text\n"
     "    label_field: topic\n", r"topics_bad\.csv: record 0: field 'topic': label 'food' .*seen in the training"),
    ("tasks: [\n", r"stream\.yaml: invalid YAML at line 2"),
])
def test_bad_custom_streams(stream, yaml_text, pattern):
    (stream.parent / "bad.jsonl").write_text('{"label": "a", "sentence": "x"}\n{"label": \n')
    (stream.parent / "topics_bad.csv").write_text("text,topic\nsoup,food\n")
    stream.write_text(yaml_text)
    with pytest.raises(DataError, match=pattern) as info:
        load_custom_stream(stream)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- encoding, batching, padding

WORDS = "<pad> <unk> <s> </s> Task : Dataset t Option a , b Answer one two three four five six seven".split()


def word_tokenizer(add_bos: bool = False) -> PreTrainedTokenizerFast:
    """One token per word or punctuation mark, so token positions can be written by hand."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="</s>", bos_token="<s>")


def ids(text: str) -> list[int]:
    return [WORDS.index(w) for w in text.split()]


PROMPT = build_prompt("one two three four five six", "t", options=["a", "b"])
PROMPT_IDS = ids("Task : t Dataset : t Option : a , b one two three four five six Answer :")


def test_encode_trains_only_the_answer():
    (item,) = encode(word_tokenizer(), [Example(PROMPT, "b")], max_length=64)
    assert item["input_ids"] == PROMPT_IDS + ids("b </s>")
    assert item["labels"] == [IGNORE_INDEX] * len(PROMPT_IDS) + ids("b </s>")
    (with_bos,) = encode(word_tokenizer(add_bos=True), [Example(PROMPT, "b")], max_length=64)
    assert with_bos["input_ids"] == [2] + PROMPT_IDS + ids("b </s>")
    assert with_bos["labels"] == [IGNORE_INDEX] * (1 + len(PROMPT_IDS)) + ids("b </s>")


def test_truncation_cuts_the_middle_and_keeps_the_answer():
    # keep_last defaults to len(tokens("\nAnswer:")) + 1 = 3: "six Answer :".
    (item,) = encode(word_tokenizer(), [Example(PROMPT, "a , b")], max_length=14)
    target = ids("a , b </s>")
    assert item["input_ids"] == PROMPT_IDS[:7] + ids("six Answer :") + target
    assert item["labels"] == [IGNORE_INDEX] * 10 + target
    assert len(item["input_ids"]) == 14
    (prompt,) = encode_prompts(word_tokenizer(), [PROMPT], max_length=10)
    assert prompt == {"input_ids": PROMPT_IDS[:7] + ids("six Answer :")}
    with pytest.raises(DataError, match="max_length=6 is too short for example 0"):
        encode(word_tokenizer(), [Example(PROMPT, "a , b")], max_length=6)


def test_training_truncates_every_prompt_of_a_task_with_the_task_wide_budget():
    from migu.config import load_config
    from migu.data import Task, task_reserve
    from migu.scenarios import FinetuneScenario

    tok = word_tokenizer()
    # longest target " a , b" + eos = 4 tokens: the prompt budget is 14 - 4 = 10 for every example,
    # the one evaluation uses (max(8, max_length - (default_max_new_tokens - 1)) = max(8, 14 - (3 + 2 - 1)))
    assert task_reserve(tok, ["b", "a , b"], 14) == 4
    assert task_reserve(tok, ["b", "a , b"], 10) == 2  # capped: the prompt keeps at least 8 tokens
    short, long = Example(PROMPT, "b"), Example(PROMPT, "a , b")
    head = PROMPT_IDS[:7] + ids("six Answer :")
    (own,) = encode(tok, [short], max_length=14)  # the per-label rule: budget 14 - 2 = 12
    assert own["input_ids"] == PROMPT_IDS[:9] + ids("six Answer :") + ids("b </s>")
    scenario = FinetuneScenario(load_config(None, ["data.max_length=14"]))
    scenario.tasks = [Task("t", ["b", "a , b"], train=[short, long], test=[])]
    a, b = scenario.encode(tok, [short, long])
    assert a["input_ids"] == head + ids("b </s>") and b["input_ids"] == head + ids("a , b </s>")
    assert a["labels"] == [IGNORE_INDEX] * 10 + ids("b </s>")
    assert encode_prompts(tok, [PROMPT], max_length=10) == [{"input_ids": head}]  # what evaluation feeds
    (other,) = scenario.encode(tok, [Example(PROMPT, "b")])  # an example of no loaded task: its own target
    assert other == own
    with pytest.raises(ValueError, match="reserve has 1 entries for 2 examples"):
        encode(tok, [short, long], 14, reserve=[4])


def test_length_grouped_batches():
    lengths = [(i * 37) % 101 for i in range(1000)]
    batches = length_grouped_batches(lengths, 8, seed=3, mega_batch_mult=10)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert sorted(len(b) for b in batches)[1:] == [8] * 124 and len(batches) == 125
    assert batches == length_grouped_batches(lengths, 8, seed=3, mega_batch_mult=10)
    assert batches != length_grouped_batches(lengths, 8, seed=4, mega_batch_mult=10)
    # One mega-batch: sorted by length inside, but the batch order is shuffled afterwards.
    maxima = [max(lengths[i] for i in b) for b in length_grouped_batches(lengths, 8, seed=3, mega_batch_mult=1000)]
    assert maxima != sorted(maxima, reverse=True)
    padding = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    naive = [list(range(s, min(s + 8, 1000))) for s in range(0, 1000, 8)]
    naive_padding = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in naive)
    assert padding < naive_padding / 5


def test_collate_pads_right_and_left():
    items = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    right = collate(items, pad_token_id=0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert right["input_ids"].dtype == torch.long and right["attention_mask"].dtype == torch.long
    left = collate(items, pad_token_id=0, padding_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left["labels"].tolist() == [[-100, 6, 7], [-100, -100, 8]]
    prompts_only = collate([{"input_ids": [1, 2]}, {"input_ids": [3]}], pad_token_id=9, padding_side="left")
    assert set(prompts_only) == {"input_ids", "attention_mask"}
    assert prompts_only["input_ids"].tolist() == [[1, 2], [9, 3]]
    with pytest.raises(ValueError, match="padding_side"):
        collate(items, 0, padding_side="middle")
