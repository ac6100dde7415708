"""The sections of the run configuration (`model.*`, `data.*`, `train.*`, `eval.*`, `migu.*`, `pretrain.*`).

Each is a dataclass whose fields carry attribute docstrings (shown by `migu run --help`) and whose
`validate()` raises a one-line `ConfigError` naming the dotted key. `migu.config` assembles them into
`RunConfig` and re-exports every name here; import them from there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

PROVENANCE_KEY = "provenance"


class ConfigError(ValueError):
    """An invalid configuration; the message is one line naming the key, e.g. `seed=-1: must be >= 0`."""


def _check(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={_show(value)}: {rule}")


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


def _first_line(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[0].strip() if lines else ""


# ------------------------------------------------------------------------------------------ sections
@dataclass
class ModelConfig:
    """The model to train."""

    name: str = "smollm2-135m"
    """`smollm2-135m` (the embedded SmolLM2-135M-Instruct), a local model directory, or a cached hub id."""
    attention: str = "auto"
    """Attention kernel (HF `attn_implementation`): `auto` = `eager` on a CPU under bf16 (torch's CPU flash-attention backward made a SmolLM2 training step ×1.15 slower there), the model's default (`sdpa`) elsewhere; or `sdpa`, `eager`, any kernel the model supports. The resolved value is recorded in config.yaml and summary.json."""

    def validate(self) -> None:
        _check(bool(self.name.strip()), "model.name", self.name, "must not be empty")
        _check(bool(self.attention.strip()), "model.attention", self.attention, "must not be empty")


@dataclass
class DataConfig:
    """The task stream: a published benchmark order, an explicit task list, or a custom stream file."""

    benchmark: str = "standard"
    """Published benchmark: `standard` (orders 1-3, 4 tasks) or `long` (orders 4-6, 15 tasks)."""
    order: int = 1
    """Task order of the benchmark (1-3 standard, 4-6 long), from the data's orders.json."""
    tasks: Optional[list[str]] = None
    """Explicit task names from the benchmark data, in training order; overrides benchmark/order (and a stream set by an earlier layer)."""
    stream: Optional[str] = None
    """Custom stream YAML (see migu.data.custom); overrides benchmark/order (and tasks set by an earlier layer)."""
    data_dir: Optional[str] = None
    """CL_Benchmark directory; null: migu.data.default_data_dir() ($MIGU_DATA_DIR, else ../shared/data/CL_Benchmark next to the checkout, else ./data/CL_Benchmark)."""
    train_per_task: int = 64
    """Training examples per task, a seeded label-stratified sample; 0 = all."""
    test_per_task: int = 32
    """Test examples per task, a seeded label-stratified sample; 0 = all."""
    max_length: int = 128
    """Longest token sequence; longer prompts lose tokens from their middle, the answer is always kept."""
    seed: Optional[int] = None
    """Seed of the subsampling; null: the run seed."""
    max_target_length: int = 50
    """Encoder-decoder models (T5, BART) only: longest decoder target (label tokens + eos); the encoder's source is cut to data.max_length."""

    def validate(self) -> None:
        _check(self.benchmark in ("standard", "long"), "data.benchmark", self.benchmark,
               "must be 'standard' or 'long'")
        _check(1 <= self.order <= 6, "data.order", self.order, "must be in 1..6 (standard 1-3, long 4-6)")
        if self.tasks is not None:
            _check(len(self.tasks) > 0, "data.tasks", self.tasks, "must name at least one task (or be null)")
            _check(len(set(self.tasks)) == len(self.tasks), "data.tasks", self.tasks, "names a task twice")
            _check(self.stream is None, "data.stream", self.stream, "set either data.tasks or data.stream, not both")
        _check(self.train_per_task >= 0, "data.train_per_task", self.train_per_task, "must be >= 0 (0 = all)")
        _check(self.test_per_task >= 0, "data.test_per_task", self.test_per_task, "must be >= 0 (0 = all)")
        _check(self.max_length >= 8, "data.max_length", self.max_length, "must be >= 8")
        _check(self.seed is None or self.seed >= 0, "data.seed", self.seed, "must be >= 0 or null")
        _check(self.max_target_length >= 2, "data.max_target_length", self.max_target_length, "must be >= 2")


@dataclass
class TrainConfig:
    """The optimisation, identical for every method: AdamW, constant learning rate, fresh per task."""

    lr: Optional[float] = None
    """Learning rate; null: the method's default (seq-ft 1e-5, seq-lora 1e-4)."""
    batch_size: int = 8
    """Examples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (the loss is a token mean over the whole step)."""
    epochs: int = 1
    """Passes over each task's training examples."""
    max_grad_norm: Optional[float] = 1.0
    """Gradient-norm clipping after MIGU's mask; null or 0 = no clipping."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    group_by_length: bool = True
    """Batch examples of similar length together (padding dominates CPU cost otherwise)."""
    checkpoint: bool = True
    """Write checkpoints/last after every task (needed by --resume); false also disables step checkpoints."""
    precision: str = "auto"
    """`auto`: bf16 on a CUDA GPU with bfloat16 and on CPUs with bf16 kernels (AMX or AVX512-bf16), else fp32 (the resolved value is recorded in config.yaml and summary.json); `fp32`; `bf16`: autocast to bfloat16; `fp16`: autocast + loss scaling, CUDA only. Weights, optimizer state and MIGU statistics stay float32; evaluation runs under the same precision."""
    gradient_checkpointing: bool = False
    """Recompute block activations in backward instead of storing them (less memory, ~30% more compute); MIGU masks are unchanged."""
    device: str = "auto"
    """`auto`: cuda:LOCAL_RANK when CUDA is available, else cpu; `cpu`; `cuda`."""
    engine: str = "ddp"
    """Data-parallel engine under torchrun / accelerate launch: `ddp` (replicas), `fsdp` (torch FSDP2: parameters, gradients and AdamW state sharded over the processes; full fine-tuning methods, fp32/bf16); `deepspeed` is refused with the reason (docs/distributed.md)."""
    fsdp_checkpoint: str = "sharded"
    """Checkpoints of train.engine=fsdp: `sharded` (each rank writes its shards with torch.distributed.checkpoint into checkpoints/last/dcp/; no rank holds the whole state) or `full` (whole tensors gathered, params.safetensors: every rank holds the whole state once per checkpoint). Either resumes with any process count."""
    dist_timeout_s: float = 1800.0
    """Seconds a process waits for the others in a collective before failing (a dead peer never hangs a run forever); must exceed the longest rank-0-only work, e.g. writing a checkpoint."""
    task_epochs: Optional[dict[str, int]] = None
    """Epochs per task name, overriding train.epochs for those tasks (the paper: {WiC: 2} in order 5, {MNLI: 2} in order 6); a phase of several tasks takes the largest."""
    lr_per_phase: Optional[list[float]] = None
    """Learning rate of phase i = lr_per_phase[i], its last entry for later phases (O-LoRA's LLaMA scripts: [1e-3, 1e-4]); null: train.lr for every phase."""
    save_every_steps: int = 0
    """Also write a step checkpoint (parameters, optimizer, method and RNG state, data position) every N optimizer steps inside a task, so --resume continues mid-task; 0 = only between tasks. Keeps `last` and `previous`."""
    save_every_minutes: float = 0.0
    """Also write a step checkpoint when this many minutes passed since the last one (for wall-clock budgets); 0 = off."""

    def validate(self) -> None:
        _check(self.lr is None or self.lr > 0, "train.lr", self.lr, "must be > 0 or null")
        _check(self.batch_size >= 1, "train.batch_size", self.batch_size, "must be >= 1")
        _check(self.grad_accum >= 1, "train.grad_accum", self.grad_accum, "must be >= 1")
        _check(self.epochs >= 1, "train.epochs", self.epochs, "must be >= 1")
        _check(self.max_grad_norm is None or self.max_grad_norm >= 0, "train.max_grad_norm", self.max_grad_norm,
               "must be >= 0 or null")
        _check(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "must be >= 0")
        _check(self.precision in ("auto", "fp32", "bf16", "fp16"), "train.precision", self.precision,
               "must be 'auto', 'fp32', 'bf16' or 'fp16'")
        _check(self.device in ("auto", "cpu", "cuda"), "train.device", self.device, "must be 'auto', 'cpu' or 'cuda'")
        _check(self.engine in ENGINES, "train.engine", self.engine, "must be 'ddp', 'fsdp' or 'deepspeed'")
        _check(self.fsdp_checkpoint in ("sharded", "full"), "train.fsdp_checkpoint", self.fsdp_checkpoint,
               "must be 'sharded' or 'full'")
        _check(self.dist_timeout_s > 0, "train.dist_timeout_s", self.dist_timeout_s, "must be > 0")
        for task, n in (self.task_epochs or {}).items():
            _check(n >= 1, f"train.task_epochs.{task}", n, "must be >= 1")
        if self.lr_per_phase is not None:
            _check(len(self.lr_per_phase) > 0 and all(x > 0 for x in self.lr_per_phase), "train.lr_per_phase",
                   self.lr_per_phase, "must list learning rates > 0 (or be null)")
        _check(self.save_every_steps >= 0, "train.save_every_steps", self.save_every_steps, "must be >= 0 (0 = off)")
        _check(self.save_every_minutes >= 0, "train.save_every_minutes", self.save_every_minutes,
               "must be >= 0 (0 = off)")
        for key in ("save_every_steps", "save_every_minutes"):
            _check(self.checkpoint or not getattr(self, key), f"train.{key}", getattr(self, key),
                   "needs train.checkpoint=true")


ENGINES = ("ddp", "fsdp", "deepspeed")

@dataclass
class EvalConfig:
    """Evaluation after every task on the test split of every task of the sequence."""

    mode: str = "generate"
    """`generate`: greedy answer, exact match after normalisation; `rank`: the label with the highest log-likelihood."""
    batch_size: int = 16
    """Examples per evaluation batch (sorted by length to limit padding)."""
    max_new_tokens: Optional[int] = None
    """Generation length; null: per task, the longest label's token count + 2."""
    prefix_cache: bool = True
    """Run each task's shared prompt prefix (task line, instruction, options) once per evaluation and reuse its key/value cache for every batch; false: every prompt from scratch (same predictions in fp32, slower)."""
    untrained: bool = True
    """Also evaluate the model before any training (row `untrained`, needed for FWT)."""
    matrix: str = "full"
    """Cells of R evaluated: `full` (every task after every task) or `diagonal` (after task i only tasks i and i+1, the cells BWT and FWT need, and every task after the last; a 15-task stream evaluates 43 cells instead of 225; forgetting is then not measured) or `last` (every task after the last task only, as the paper's reference code: AA only)."""

    def validate(self) -> None:
        _check(self.mode in ("generate", "rank"), "eval.mode", self.mode, "must be 'generate' or 'rank'")
        _check(self.matrix in ("full", "diagonal", "last"), "eval.matrix", self.matrix,
               "must be 'full', 'diagonal' or 'last'")
        _check(self.batch_size >= 1, "eval.batch_size", self.batch_size, "must be >= 1")
        _check(self.max_new_tokens is None or self.max_new_tokens >= 1, "eval.max_new_tokens",
               self.max_new_tokens, "must be >= 1 or null")


@dataclass
class MiguConfig:
    """MIGU: keep only the gradient rows of the highest-magnitude output units of each targeted layer."""

    enabled: bool = False
    """Mask gradients with MIGU (ignored when compare_migu is true: both settings run)."""
    threshold: float = 0.7
    """T: the fraction of output units per layer whose gradient rows are zeroed each step."""
    mode: str = "grad"
    """`grad`: zero gradient rows (the paper); `update`: also keep masked rows exactly unchanged under AdamW."""
    target_modules: Optional[list[str]] = None
    """Module-name patterns MIGU ranks (PEFT style); null: the method's choice (seq-ft: every block linear, seq-lora: the adapted layers)."""
    first_task: str = "skip"
    """`skip`: the first phase trains without MIGU, exactly like the run without it (the reference code's `--is_first_task True`); `mask`: every phase is masked. A single-phase run (mtl) with `skip` never masks."""
    include_lm_head: bool = False
    """Also rank the LM head's rows (vocabulary entries) by mean |logit| over the counted positions whose logits are computed (those that predict an answer token); a tied input embedding shares those rows. A frozen head (LoRA methods) is left alone."""
    lora_b: str = "layer"
    """LoRA B rows ranked by `layer`: the whole layer output, base + LoRA (the paper's text); `own`: B's own output (the reference code; every row kept while it is all zero, e.g. B initialised to zero)."""
    tokens: str = "all"
    """Tokens the magnitudes average over: `all` real (non-padding) tokens, prompt included; `answer`: only positions that predict an answer token (encoder-decoder models: the decoder's real positions are exactly those; encoder layers count the prompt's real tokens either way)."""

    def validate(self) -> None:
        _check(0.0 <= self.threshold < 1.0, "migu.threshold", self.threshold, "must be in [0, 1)")
        _check(self.mode in ("grad", "update"), "migu.mode", self.mode, "must be 'grad' or 'update'")
        _check(self.target_modules is None or len(self.target_modules) > 0, "migu.target_modules",
               self.target_modules, "must name at least one module (or be null)")
        _check(self.first_task in ("skip", "mask"), "migu.first_task", self.first_task, "must be 'skip' or 'mask'")
        _check(self.lora_b in ("layer", "own"), "migu.lora_b", self.lora_b, "must be 'layer' or 'own'")
        _check(self.tokens in ("all", "answer"), "migu.tokens", self.tokens, "must be 'all' or 'answer'")


@dataclass
class DomainConfig:
    """One domain of a continual pre-training stream."""

    name: str = ""
    """Domain name: a column of the perplexity matrix."""
    train: list[str] = field(default_factory=list)
    """Sources: .txt (blank-line separated documents), .jsonl/.json (records with a text field) or CL_Benchmark task names (sentences, labels dropped)."""
    heldout: Optional[list[str]] = None
    """Held-out sources; null: each task's test split, and heldout_fraction of each file's documents."""
    text_field: Optional[str] = None
    """JSON text field of this domain's files; null: pretrain.text_field."""


@dataclass
class PretrainConfig:
    """Continual pre-training (scenario: pretrain): text domains packed into blocks, perplexity after each (docs/pretrain.md)."""

    domains: Optional[list[DomainConfig]] = None
    """Domains in training order; null: news (agnews+dbpedia) → reviews (amazon+yelp+IMDB) → qa (BoolQA+MultiRC)."""
    block_size: int = 128
    """Tokens per packed block (documents joined with eos, never crossing a document without one)."""
    train_blocks_per_domain: int = 24
    """Training blocks per domain, from seeded shuffled documents; 0 = every document."""
    heldout_blocks_per_domain: int = 8
    """Held-out blocks per domain (perplexity); 0 = every held-out document."""
    general: Optional[str] = None
    """General held-out text, never trained on (.txt/.jsonl/.json); null: migu/assets/general_samples.jsonl."""
    general_blocks: int = 16
    """Blocks of the general held-out set; 0 = all of it."""
    text_field: str = "text"
    """Text field of .jsonl/.json sources."""
    heldout_fraction: float = 0.1
    """Share of a file source's documents held out when its domain has no heldout sources."""

    def validate(self) -> None:
        if self.domains is not None:
            _check(len(self.domains) > 0, "pretrain.domains", "[]", "must list at least one domain (or be null)")
            names = [d.name for d in self.domains]
            for i, d in enumerate(self.domains):
                _check(bool(d.name.strip()), f"pretrain.domains[{i}].name", d.name, "must not be empty")
                _check(d.name != "general", f"pretrain.domains[{i}].name", d.name,
                       "'general' is the general held-out column; choose another name")
                _check(names.count(d.name) == 1, f"pretrain.domains[{i}].name", d.name, "names a domain twice")
                _check(len(d.train) > 0, f"pretrain.domains[{i}].train", d.train, "must list at least one source")
        _check(self.block_size >= 2, "pretrain.block_size", self.block_size, "must be >= 2")
        for key in ("train_blocks_per_domain", "heldout_blocks_per_domain", "general_blocks"):
            _check(getattr(self, key) >= 0, f"pretrain.{key}", getattr(self, key), "must be >= 0 (0 = all)")
        _check(0.0 < self.heldout_fraction < 1.0, "pretrain.heldout_fraction", self.heldout_fraction,
               "must be in (0, 1)")
