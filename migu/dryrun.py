"""`migu run --dry-run`: what a config will cost, without loading weights.

Resolves the config, reads the task stream, builds the model's skeleton from its config alone (on
the `meta` device: no memory, no weights) and prints tasks, examples, optimizer steps, evaluation
cells, the parameter count and an estimate of training + evaluation FLOPs and wall time.

FLOPs (the usual dense-transformer estimate, Kaplan et al. 2020): a forward pass costs 2 x N FLOPs
per token, N the parameters a token passes through (an encoder-decoder: the encoder's for source
tokens, the decoder's and the LM head's for target tokens); training costs 3x the forward (6N) with
full fine-tuning and 2x (4N: no weight gradients of the frozen base) with a LoRA method.
Generation costs a forward over the prompt plus one per generated token; ranking one forward per
(example, label). Attention's quadratic term is left out (small at 512 tokens against d_model).
Tokens come from the model's tokenizer when it is available locally, else from 4 characters per
token. The wall time is FLOPs / rate, with rate either `--flops` (e.g. 4e14 for bf16 at about
half of an H100's peak) or a float32 matmul measured on this machine (a busy machine measures
less); it assumes that rate is sustained: padding, data loading and small-batch inefficiency are
not counted.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch

from migu.config import RunConfig
from migu.masking import masked_phase
from migu.metrics import evaluated_columns
from migu.models import ModelError, load_config, model_class
from migu.steps import check_task_epochs, phase_epochs, phase_lr

# Configs of the paper's models, used when the model is not available locally (the machine is offline):
# the published architecture hyperparameters of the hub checkpoints.
KNOWN_CONFIGS = {
    "t5-large": ("t5", dict(d_model=1024, d_ff=4096, d_kv=64, num_layers=24, num_heads=16, vocab_size=32128,
                            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)),
    "google-t5/t5-large": "t5-large",
    "google/flan-t5-large": ("t5", dict(d_model=1024, d_ff=2816, d_kv=64, num_layers=24, num_heads=16,
                                        vocab_size=32128, feed_forward_proj="gated-gelu",
                                        tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0,
                                        eos_token_id=1)),
    "meta-llama/Llama-2-7b-hf": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                               num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                               max_position_embeddings=4096)),
}
CHARS_PER_TOKEN = 4.0


def model_config(name: str):
    """(transformers config, where it came from): the local model's, else migu's table of known models."""
    try:
        return load_config(name), "local"
    except ModelError:
        known = KNOWN_CONFIGS.get(name)
        if isinstance(known, str):
            known = KNOWN_CONFIGS[known]
        if known is None:
            raise
        from transformers import AutoConfig

        return AutoConfig.for_model(known[0], **known[1]), "migu's table (not available locally)"


def parameter_counts(config) -> dict:
    """Parameters of the model built from `config` on the meta device: total, encoder, decoder side."""
    with torch.device("meta"):
        model = model_class(config).from_config(config)
    total = sum(p.numel() for p in model.parameters())
    if getattr(config, "is_encoder_decoder", False):
        encoder = sum(p.numel() for n, p in model.named_parameters() if n.startswith("encoder.")
                      and "embed_tokens" not in n)
        return {"total": total, "encoder": encoder, "decoder": total - encoder}
    return {"total": total, "encoder": 0, "decoder": total}


def measure_flops(seconds: float = 0.5, n: int = 512) -> float:
    """Float32 matmul FLOP/s of this machine (n x n matmuls for about `seconds`)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2.0 * n ** 3 * count / (time.perf_counter() - start)


def _token_counter(name: str):
    try:
        from transformers import AutoTokenizer

        from migu.models import _resolve

        source, kwargs = _resolve(name)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        return (lambda texts: sum(len(x) for x in tokenizer(list(texts), add_special_tokens=False)["input_ids"])), \
            "tokenizer"
    except Exception:  # noqa: BLE001 - any failure: fall back to the character estimate
        return (lambda texts: sum(math.ceil(len(t) / CHARS_PER_TOKEN) for t in texts)), \
            f"{CHARS_PER_TOKEN:g} characters per token"


def plan(cfg: RunConfig, flops: float | None = None) -> dict:
    """Everything `--dry-run` prints, as a dict (see the module docstring)."""
    from migu.methods import get_method
    from migu.scenarios import get_scenario

    cfg.validate()
    if cfg.scenario != "finetune":
        from migu.config import ConfigError

        raise ConfigError(f"scenario={cfg.scenario}: --dry-run estimates finetune runs only")
    tasks = get_scenario(cfg).load_tasks()
    config, config_source = model_config(cfg.model.name)
    params = parameter_counts(config)
    seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    count, token_source = _token_counter(cfg.model.name)
    method = get_method(cfg.method.name)(cfg.method_options)
    phases = method.phases(tasks)
    lora = "lora" in cfg.method.name
    train_factor = 4 if lora else 6
    t = cfg.train
    # per token: 2N forward; encoder-decoder sources pass the encoder, targets the decoder
    n_src = params["encoder"] if seq2seq else params["decoder"]
    n_tgt = params["decoder"]
    rows, train_flops = [], 0.0
    check_task_epochs(t, tasks)

    default_lr = t.lr if t.lr is not None else method.default_lr
    max_src = cfg.data.max_length
    for index, (name, phase_tasks) in enumerate(phases):
        examples = [ex for task in phase_tasks for ex in task.train]
        epochs = phase_epochs(t, phase_tasks)
        micro = math.ceil(len(examples) / t.batch_size)
        steps = math.ceil(micro / t.grad_accum) * epochs
        src = min(count([ex.prompt for ex in examples]), max_src * len(examples))
        tgt = count([ex.target for ex in examples]) + len(examples)  # + eos
        if seq2seq:
            flops_phase = train_factor * (n_src * src + n_tgt * tgt) * epochs
        else:
            flops_phase = train_factor * n_tgt * (src + tgt) * epochs
        train_flops += flops_phase
        rows.append({"phase": name, "train": len(examples), "epochs": epochs, "steps": steps,
                     "lr": phase_lr(t, default_lr, index), "flops": flops_phase})
    # evaluation: the cells of eval.matrix (+ the untrained row)
    n_phases, n_tasks = len(phases), len(tasks)
    cells = sum(len(evaluated_columns(cfg.eval.matrix, i, n_tasks, n_phases)) for i in range(-1, n_phases)
                if i >= 0 or cfg.eval.untrained)
    eval_task_flops = []
    for task in tasks:
        src = min(count([ex.prompt for ex in task.test]), max_src * len(task.test))
        label_tokens = max(count([label]) for label in task.labels) + 2
        if cfg.eval.mode == "rank":
            k = len(task.labels)
            flops_task = 2 * k * (n_src * src + n_tgt * label_tokens * len(task.test))
        else:
            new = (cfg.eval.max_new_tokens or label_tokens) * len(task.test)
            flops_task = 2 * (n_src * src + n_tgt * new)
        eval_task_flops.append(flops_task)
    mean_cell = sum(eval_task_flops) / max(1, len(eval_task_flops))
    eval_flops = mean_cell * cells
    # compare_migu: the second run reuses the untrained row and, under first_task skip, the first phase
    runs, shared = (2 if cfg.compare_migu else 1), 0.0
    if cfg.compare_migu:
        shared = mean_cell * (n_tasks if cfg.eval.untrained else 0)
        if not masked_phase(dataclasses.replace(cfg.migu, enabled=True), 0) and cfg.train.checkpoint and rows:
            shared += rows[0]["flops"] + mean_cell * len(evaluated_columns(cfg.eval.matrix, 0, n_tasks, n_phases))
    measured = flops is None
    rate = measure_flops() if measured else float(flops)
    return {"model": cfg.model.name, "architecture": config.model_type, "encoder_decoder": seq2seq,
            "config_source": config_source, "parameters": params, "method": cfg.method.name,
            "migu": cfg.migu.enabled or cfg.compare_migu, "runs": runs,
            "tasks": [{"name": task.name, "train": len(task.train), "test": len(task.test)} for task in tasks],
            "phases": rows, "steps": sum(r["steps"] for r in rows),
            "global_batch": t.batch_size * t.grad_accum, "eval_matrix": cfg.eval.matrix, "eval_cells": cells,
            "eval_examples": sum(len(task.test) for task in tasks) * cells / max(1, n_tasks),
            "train_flops": train_flops, "eval_flops": eval_flops, "token_source": token_source,
            "flop_rate": rate, "flop_rate_source": "measured float32 matmul on this machine" if measured
            else "--flops",
            "wall_time_s": (runs * (train_flops + eval_flops) - shared) / rate}


def _human(x: float, unit: str = "") -> str:
    for scale, suffix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {suffix}{unit}"
    return f"{x:.0f} {unit}".rstrip()


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def format_plan(p: dict) -> str:
    """The text `migu run --dry-run` prints."""
    params = p["parameters"]
    kind = "encoder-decoder" if p["encoder_decoder"] else "causal"
    lines = [f"model: {p['model']} ({p['architecture']}, {kind}; config from {p['config_source']})",
             f"parameters: {_human(params['total'])}"
             + (f" (encoder {_human(params['encoder'])}, decoder + head {_human(params['decoder'])})"
                if p["encoder_decoder"] else ""),
             f"method: {p['method']}{' + MIGU' if p['migu'] else ''}"
             + (" (compare_migu: 2 runs)" if p["runs"] == 2 else "") + f", global batch {p['global_batch']}",
             "", f"{'phase':<16}{'train':>9}{'epochs':>8}{'steps':>8}{'lr':>10}{'train FLOPs':>14}"]
    for r in p["phases"]:
        lines.append(f"{r['phase'][:15]:<16}{r['train']:>9}{r['epochs']:>8}{r['steps']:>8}{r['lr']:>10.0e}"
                     f"{_human(r['flops'], 'FLOP'):>14}")
    tests = ", ".join(f"{t['name']} {t['test']}" for t in p["tasks"])
    lines += ["", f"optimizer steps: {p['steps']}",
              f"test examples: {tests}",
              f"evaluation: eval.matrix={p['eval_matrix']}: {p['eval_cells']} cells, about "
              f"{p['eval_examples']:.0f} example evaluations",
              f"estimated FLOPs: training {_human(p['train_flops'], 'FLOP')}, evaluation "
              f"{_human(p['eval_flops'], 'FLOP')} (tokens by {p['token_source']}) per run",
              f"estimated wall time: {_duration(p['wall_time_s'])} at {_human(p['flop_rate'], 'FLOP/s')} "
              f"({p['flop_rate_source']};"
              " padding, data and framework overhead come on top)"]
    return "\n".join(lines)


__all__ = ["plan", "format_plan", "measure_flops", "parameter_counts", "model_config", "KNOWN_CONFIGS"]
