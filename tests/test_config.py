"""Config: precedence, strict errors naming the key, docstrings for --help, every shipped YAML valid."""

import dataclasses
from pathlib import Path

import pytest

from migu.config import (ConfigError, RunConfig, describe_options, field_docs, iter_options, load_config,
                         to_yaml)
from migu.methods import METHODS, options_key

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def test_defaults_are_valid():
    cfg = load_config()
    assert cfg.migu.threshold == 0.7 and cfg.migu.mode == "grad" and not cfg.migu.enabled
    assert (cfg.migu.first_task, cfg.migu.include_lm_head, cfg.migu.lora_b, cfg.migu.tokens) == (
        "skip", False, "layer", "all")
    assert cfg.method.name == "seq-ft" and cfg.train.lr is None and cfg.train.max_grad_norm == 1.0
    assert cfg.default_output_dir() == "runs/run-seq-ft-s0"


def test_precedence_defaults_yaml_set(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("seed: 3\nmigu: {threshold: 0.5, enabled: true}\ntrain: {lr: 5e-5}\n")
    cfg = load_config(path, ["seed=4", "train.batch_size=2"])
    assert cfg.seed == 4  # --set beats YAML
    assert cfg.migu.threshold == 0.5 and cfg.migu.enabled  # YAML beats defaults
    assert cfg.train.lr == 5e-5 and cfg.train.batch_size == 2 and cfg.train.epochs == 1  # defaults remain
    assert cfg.name == "exp"  # the file's stem, unless the YAML names it
    assert cfg.default_output_dir() == "runs/exp-seq-ft-migu-s4"
    assert load_config(path, ["name=other"]).name == "other"


@pytest.mark.parametrize("overrides, message", [
    (["migu.threshold=1.5"], "migu.threshold=1.5: must be in [0, 1)"),
    (["migu.thresh=0.5"], "migu.thresh: unknown key"),
    (["nope=1"], "nope: unknown key"),
    (["seed=abc"], "seed: Value 'abc'"),
    (["train.batch_size=0"], "train.batch_size=0: must be >= 1"),
    (["migu.mode=rows"], "migu.mode=rows: must be 'grad' or 'update'"),
    (["migu.first_task=drop"], "migu.first_task=drop: must be 'skip' or 'mask'"),
    (["migu.lora_b=both"], "migu.lora_b=both: must be 'layer' or 'own'"),
    (["migu.tokens=prompt"], "migu.tokens=prompt: must be 'all' or 'answer'"),
    (["migu.include_lm_head=sometimes"], "migu.include_lm_head: Value 'sometimes' is not a valid bool"),
    (["eval.mode=fast"], "eval.mode=fast: must be 'generate' or 'rank'"),
    (["eval.matrix=lower"], "eval.matrix=lower: must be 'full', 'diagonal' or 'last'"),
    (["eval.matrix=diagonal", "scenario=pretrain"], "eval.matrix=diagonal: 'diagonal' needs scenario 'finetune'"),
    (["migu.enabled=maybe"], "migu.enabled: Value 'maybe' is not a valid bool"),
    (["data.tasks=[a,a]"], "data.tasks=[a, a]: names a task twice"),
    (["method.name=foo"], "method.name=foo: unknown method; known: "),
    (["method.name=seq-lora", "method.seq_lora.r=0"], "method.seq_lora.r=0: must be >= 1"),
    (["method.name=seq-lora", "method.seq_lora.r=x"], "method.seq_lora.r: Value 'x'"),
    (["method.seq_lora.r=4"], "method.seq_lora: options of another method; method.name is 'seq-ft'"),
    (["seed"], "--set 'seed': expected key=value"),
])
def test_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("migu:\n  threshold: 0.5\n  colour: red\n")
    with pytest.raises(ConfigError, match=r"^migu\.colour: unknown key"):
        load_config(bad)
    bad.write_text("migu: [\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_method_options_section():
    cfg = load_config(None, ["method.name=seq-lora", "method.seq_lora.r=4", "method.seq_lora.target_modules=[q_proj]"])
    assert cfg.method_options.r == 4 and cfg.method_options.target_modules == ["q_proj"]
    assert cfg.method_options.alpha == 32 and cfg.method_options.dropout == 0.1
    # a method without options gets its empty Options instance (no section, no fields)
    assert dataclasses.asdict(load_config(None, ["method.name=seq-ft"]).method_options) == {}


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config(None, ["method.name=seq-lora", "method.seq_lora.r=4", "migu.enabled=true", "seed=7",
                             "data.tasks=[dbpedia, SST-2]"])
    text = to_yaml(cfg, {"git_commit": "abc", "versions": {"torch": "x"}})
    assert "provenance:" in text and "seq_lora" in text
    path = tmp_path / "config.yaml"
    path.write_text(text)
    assert load_config(path) == cfg  # provenance is ignored; only the chosen method's options are written
    seq_ft = to_yaml(load_config())
    assert "seq_lora" not in seq_ft


def test_every_field_has_a_docstring_and_is_in_help():
    text = describe_options()
    keys = list(iter_options())
    assert len([k for k in keys if not k[4]]) >= 30
    for key, kind, default, doc, is_section in keys:
        assert doc, f"{key} has no attribute docstring"
        if not is_section:
            assert f"  {key} ({kind}, default: " in text
            assert " ".join(doc.split()[:6]) in " ".join(text.split()), key


def test_field_docs_include_inherited_fields():
    from dataclasses import dataclass

    from migu.methods.base import LoraOptions

    @dataclass
    class Extended(LoraOptions):
        lam: float = 0.5
        """Weight of the extra term."""

    docs = field_docs(Extended)
    assert docs["lam"] == "Weight of the extra term." and docs["r"] == "LoRA rank."


def test_registry_matches_method_files():
    files = {p.stem for p in (REPO / "migu" / "methods").glob("*.py")} - {"__init__", "base"}
    assert {options_key(name) for name in METHODS} == files
    for name, cls in METHODS.items():
        assert cls.name == name


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    header = path.read_text().splitlines()
    assert header[0].startswith("# "), "a config starts with a comment saying what it is for"
    assert any(line.startswith("#") and f"migu run configs/{path.relative_to(REPO / 'configs')}" in line
               for line in header) or path.name == "quickstart.yaml" and any("migu run" in h for h in header)


def test_expected_configs_exist():
    names = {str(p.relative_to(REPO / "configs")) for p in CONFIGS}
    assert {"quickstart.yaml", "smoke.yaml"} <= names
    assert {f"standard/order{i}.yaml" for i in (1, 2, 3)} <= names
    assert {f"long/order{i}.yaml" for i in (4, 5, 6)} <= names


def test_a_later_task_source_replaces_an_earlier_one(tmp_path):
    path = tmp_path / "q.yaml"
    path.write_text("data: {tasks: [dbpedia, SST-2]}\n")
    cfg = load_config(path, ["data.stream=my_stream.yaml"])
    assert cfg.data.stream == "my_stream.yaml" and cfg.data.tasks is None
    with pytest.raises(ConfigError, match="set either data.tasks or data.stream"):
        load_config(None, ["data.stream=s.yaml", "data.tasks=[a]"])  # both in one layer: ambiguous
