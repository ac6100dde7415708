"""Run configuration: one dataclass per concern, loaded as defaults → YAML file → `--set a.b=c` overrides.

    cfg = load_config("configs/quickstart.yaml", ["migu.threshold=0.5", "seed=1"])

Merging and type checking are OmegaConf structured configs; value checks are the `validate()` methods
of the sections (migu/sections.py). Every error is a `ConfigError` whose one-line message names the dotted
key, e.g. `migu.threshold=1.5: must be in [0, 1)`. Every field carries an attribute docstring (the string literal
under it); `describe_options()` turns them into the option list of `migu run --help`.

Method options: each registered method with an `Options` dataclass gets the section
`method.<name with _>` (e.g. `method.seq_lora.r`); only the chosen method's section may be set.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from migu.methods import METHODS, options_key
from migu.sections import (  # noqa: F401  (re-exported: `from migu.config import ModelConfig` etc.)
    ENGINES, PROVENANCE_KEY, ConfigError, DataConfig, DomainConfig, EvalConfig, MiguConfig, ModelConfig,
    PretrainConfig, TrainConfig, _check, _first_line, _show)

__all__ = ["ENGINES", "PROVENANCE_KEY", "ConfigError", "DataConfig", "DomainConfig", "EvalConfig", "MiguConfig",
           "ModelConfig", "PretrainConfig", "TrainConfig", "FSDP_METHODS", "SCENARIOS", "RunConfig", "load_config",
           "to_yaml", "with_overrides", "field_docs", "iter_options", "describe_options", "default_config"]

FSDP_METHODS = ("seq-ft", "mtl", "replay")  # full fine-tuning of a fixed parameter set, no forwards of their own


def _check_engine(cfg: "RunConfig") -> None:
    """fsdp: full fine-tuning methods and no fp16; deepspeed is refused with the reason (never a no-op mask)."""
    engine = cfg.train.engine
    if engine == "ddp":
        return
    if engine == "fsdp":
        if cfg.method.name not in FSDP_METHODS:
            raise ConfigError(f"train.engine=fsdp: method {cfg.method.name!r} is not supported under FSDP (it adds "
                              f"parameters per task or runs its own passes); use one of {', '.join(FSDP_METHODS)}, "
                              "or train.engine=ddp")
        if cfg.train.precision == "fp16":
            raise ConfigError("train.engine=fsdp: train.precision=fp16 is not supported (no sharded loss scaler); "
                              "use bf16 or fp32")
        return
    if cfg.migu.enabled or cfg.compare_migu:
        raise ConfigError(f"train.engine={engine}: MIGU cannot run on DeepSpeed ZeRO: it reduces gradients into "
                          "sharded flat buffers, so masking the module's param.grad would silently do nothing; use "
                          "train.engine=fsdp or ddp (torchrun) or a single process")
    raise ConfigError(f"train.engine={engine}: DeepSpeed ZeRO is not supported by the migu runner yet; use "
                      "train.engine=fsdp or ddp (torchrun / accelerate launch) or a single process")


SCENARIOS = ("finetune", "pretrain")


def _make_method_config() -> type:
    """`MethodConfig`: `name` plus one options section per registered method that has options."""
    specs: list = [("name", str, field(default="seq-ft"))]
    docs = {"name": "The continual-learning method: " + ", ".join(sorted(METHODS)) + "."}
    for name, cls in sorted(METHODS.items()):
        if dataclasses.fields(cls.Options):
            key = options_key(name)
            specs.append((key, cls.Options, field(default_factory=cls.Options)))
            docs[key] = f"Options of `{name}` (used when method.name={name}). " + _first_line(cls.__doc__)
    klass = dataclasses.make_dataclass("MethodConfig", specs, namespace={"validate": _validate_method})
    klass.__doc__ = "The continual-learning method and its options."
    klass.__module__ = __name__
    klass.__field_docs__ = docs
    return klass


def _validate_method(self) -> None:
    _check(self.name in METHODS, "method.name", self.name, "unknown method; known: " + ", ".join(sorted(METHODS)))
    options = getattr(self, options_key(self.name), None)
    if options is not None and hasattr(options, "validate"):
        try:
            options.validate(f"method.{options_key(self.name)}")
        except ConfigError:
            raise
        except ValueError as err:
            raise ConfigError(str(err)) from None


MethodConfig = _make_method_config()


@dataclass
class RunConfig:
    """One `migu run`: a model trained by a method on a task stream, evaluated after every task."""

    name: str = "run"
    """Experiment name used in the default output_dir; default: the config file's name without .yaml."""
    seed: int = 0
    """Seed of initialisation, batch order, dropout and (unless data.seed is set) subsampling."""
    output_dir: Optional[str] = None
    """Run directory; null: runs/<name>-<method>[-migu]-s<seed> (compare_migu: runs/<name>-<method>-compare-s<seed>)."""
    compare_migu: bool = False
    """Run twice, without and with MIGU, into <output_dir>/no-migu and <output_dir>/migu, and print both side by side. The MIGU run reuses the untrained evaluation and, under migu.first_task skip, the first task (trained unmasked alike: it starts from a copy of the first run's)."""
    scenario: str = "finetune"
    """`finetune`: the task stream (data.*), accuracy matrix; `pretrain`: text domains (pretrain.*), perplexity matrix."""
    threads: Optional[int] = None
    """torch CPU threads; null: torch's default."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model."""
    data: DataConfig = field(default_factory=DataConfig)
    """The task stream."""
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    """Continual pre-training domains (scenario: pretrain)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation."""
    migu: MiguConfig = field(default_factory=MiguConfig)
    """MIGU gradient masking."""
    method: MethodConfig = field(default_factory=MethodConfig)  # type: ignore[valid-type]
    """The continual-learning method."""

    def validate(self) -> "RunConfig":
        """Check every section; raise `ConfigError` naming the first bad key. Returns self."""
        _check(bool(self.name) and "/" not in self.name, "name", self.name, "must be non-empty without '/'")
        _check(self.seed >= 0, "seed", self.seed, "must be >= 0")
        _check(self.threads is None or self.threads >= 1, "threads", self.threads, "must be >= 1 or null")
        _check(self.scenario in SCENARIOS, "scenario", self.scenario, "must be " + " or ".join(map(repr, SCENARIOS)))
        for section in (self.model, self.data, self.pretrain, self.train, self.eval, self.migu, self.method):
            section.validate()
        _check(self.eval.matrix == "full" or self.scenario == "finetune", "eval.matrix", self.eval.matrix,
               "'diagonal' needs scenario 'finetune' (a pretrain run evaluates every domain)")
        _check_engine(self)
        return self

    @property
    def method_options(self):
        """The chosen method's options object (its `Options` dataclass instance)."""
        options = getattr(self.method, options_key(self.method.name), None)
        return options if options is not None else METHODS[self.method.name].Options()

    def default_output_dir(self) -> str:
        suffix = "-compare" if self.compare_migu else ("-migu" if self.migu.enabled else "")
        return f"runs/{self.name}-{self.method.name}{suffix}-s{self.seed}"


# ------------------------------------------------------------------------------------------ loading
def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Defaults → YAML file (if any) → `key=value` overrides (dotted keys, YAML values), then validate.

    Raises:
        ConfigError: unreadable YAML, unknown key, wrong type or invalid value (one line naming the key).
    """
    layers = []
    name = None
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            doc = OmegaConf.load(path)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}:{where} invalid YAML: {getattr(err, 'problem', None) or err}") from None
        except OmegaConfBaseException as err:
            raise ConfigError(f"{path}: {_first_line(str(err))}") from None
        if doc is None or (OmegaConf.is_dict(doc) and len(doc) == 0):
            doc = OmegaConf.create({})
        if not OmegaConf.is_dict(doc):
            raise ConfigError(f"{path}: expected a mapping of config sections at the top level")
        doc.pop(PROVENANCE_KEY, None)
        layers.append(doc)
        name = path.stem
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set migu.threshold=0.5")
    if overrides:
        try:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        except OmegaConfBaseException as err:
            raise ConfigError(f"--set: {_first_line(str(err))}") from None
    try:
        merged = OmegaConf.structured(RunConfig)
        if name is not None:
            merged.name = name
        for layer in layers:
            _one_task_source(merged, layer)
            merged = OmegaConf.merge(merged, layer)
        _check_method_sections(merged, layers)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _from_omegaconf(err) from None
    return cfg.validate()


def _one_task_source(merged, layer) -> None:
    """A layer that names data.tasks or data.stream replaces the other source set by an earlier layer."""
    data = layer.get("data") if OmegaConf.is_dict(layer) else None
    if not OmegaConf.is_dict(data):
        return
    for key, other in (("tasks", "stream"), ("stream", "tasks")):
        if data.get(key) is not None and other not in data:
            merged.data[other] = None


def _check_method_sections(merged, layers) -> None:
    """Only the chosen method's options section may be set (a typo'd method would silently ignore it)."""
    chosen = options_key(merged.method.name)
    for layer in layers:
        section = layer.get("method") if OmegaConf.is_dict(layer) else None
        if not OmegaConf.is_dict(section):
            continue
        for key in section:
            if key != "name" and key != chosen:
                where = f"its options go under method.{chosen}" if chosen in merged.method else "it has no options"
                raise ConfigError(f"method.{key}: options of another method; method.name is {merged.method.name!r}"
                                  f" ({where})")


def _from_omegaconf(err: OmegaConfBaseException) -> ConfigError:
    key = getattr(err, "full_key", None)
    message = _first_line(getattr(err, "msg", None) or str(err))
    if type(err).__name__ == "ConfigKeyError" and key:
        return ConfigError(f"{key}: unknown key")
    return ConfigError(f"{key}: {message}" if key else message)


def to_yaml(cfg: RunConfig, provenance: dict | None = None) -> str:
    """The resolved config as YAML (loadable by `load_config`), with an optional provenance section."""
    data = OmegaConf.to_container(OmegaConf.structured(cfg))
    chosen = options_key(cfg.method.name)
    data["method"] = {k: v for k, v in data["method"].items() if k in ("name", chosen)}  # only the used options
    if provenance is not None:
        data[PROVENANCE_KEY] = provenance
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def with_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """A copy of `cfg` with dotted `key=value` overrides applied and validated."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cfg), OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(merged).validate()
    except OmegaConfBaseException as err:
        raise _from_omegaconf(err) from None


# ------------------------------------------------------------------------------------------ --help
@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """{field name: attribute docstring} of a dataclass, including inherited fields."""
    own = getattr(cls, "__field_docs__", None)
    if own is not None and "__field_docs__" in cls.__dict__:
        return dict(own)
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def iter_options(cls: type = RunConfig, prefix: str = ""):
    """Yield `(dotted key, type text, default, docstring, is_section)` for every field, depth first."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    instance = cls()
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            yield key, "section", None, docs.get(f.name, ""), True
            yield from iter_options(hint, key + ".")
        else:
            yield key, _type_text(hint), getattr(instance, f.name), docs.get(f.name, ""), False


def describe_options(width: int = 100) -> str:
    """The option list shown by `migu run --help`: every key, its type, default and docstring."""
    lines = []
    for key, kind, default, doc, is_section in iter_options():
        if is_section:
            lines += ["", f"{key}:  {doc}"]
            continue
        lines.append(f"  {key} ({kind}, default: {_show(default)})")
        lines += textwrap.wrap(doc, width=width, initial_indent="      ", subsequent_indent="      ",
                               break_on_hyphens=False, break_long_words=False)
    return "\n".join(lines).lstrip("\n")


def _type_text(hint: Any) -> str:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return " | ".join(_type_text(a) for a in inner) + " | null"
    if origin in (list, tuple):
        return f"list[{', '.join(_type_text(a) for a in args)}]" if args else "list"
    return getattr(hint, "__name__", str(hint))


def _repo_configs() -> Path:
    return Path(__file__).resolve().parent.parent / "configs"


def default_config() -> Path:
    """configs/quickstart.yaml of the checkout (or of the working directory)."""
    for candidate in (_repo_configs() / "quickstart.yaml", Path("configs") / "quickstart.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError("no config file given and configs/quickstart.yaml not found; pass a config file")
