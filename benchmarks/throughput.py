"""Training and evaluation throughput: today's naive path against migu's defaults, and the machine's limit.

    python benchmarks/throughput.py                    # embedded SmolLM2-135M, batch 8 × 128 tokens
    python benchmarks/throughput.py --quick --model DIR  # a few steps (the test runs it on the tiny model)

Both paths run in one process, interleaved (A B B A ...), so machine noise hits them alike:
  * naive: fp32, the model's own attention (sdpa), evaluation with HF `generate` from scratch per batch
    (rank: every label's full sequence);
  * default: `train.precision: auto` and `model.attention: auto` as resolved here, evaluation with the
    shared-prefix KV cache.
Training paths: full fine-tuning and LoRA (seq-ft / seq-lora setups), each without and with MIGU; every
step is the runner's (`step_loss` under `StepRunner`'s autocast, MIGU mask, clipping, fused AdamW).
Evaluation paths: greedy generation and label ranking on benchmark test prompts.

The limit: measured matmul FLOP/s at the model's shapes ([batch·tokens, hidden] @ [hidden, intermediate])
in fp32 and bf16, and the model's FLOPs per example (2 × block-linear parameters per token + attention,
training 3× forward; evaluation counts the work of the naive path, every prompt token, so a path that
skips the shared prefix can exceed 1). `fraction_of_limit` = examples/s × FLOPs per example / FLOP/s at
the path's precision. Writes JSON (default results/throughput/throughput-<time>.json) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from migu import distributed  # noqa: E402
from migu.config import load_config  # noqa: E402
from migu.core import MIGU  # noqa: E402
from migu.data import Example, Task, build_prompt, collate, encode  # noqa: E402
from migu.evaluate import evaluate_task  # noqa: E402
from migu.methods import get_method  # noqa: E402
from migu.models import load_model_and_tokenizer, set_attention  # noqa: E402
from migu.steps import adamw, step_loss  # noqa: E402

TRAIN_PATHS = [("train_full_ft", "seq-ft", False), ("train_full_ft_migu", "seq-ft", True),
               ("train_lora", "seq-lora", False), ("train_lora_migu", "seq-lora", True)]


def load_examples(n_train: int, n_test: int) -> tuple[list, Task]:
    """dbpedia from the benchmark data (14 labels, long shared header); synthetic prompts if it is missing."""
    try:
        from migu.data import load_benchmark_task

        task = load_benchmark_task(None, "dbpedia", n_train, n_test, 0)
        return task.train, task
    except Exception as exc:  # noqa: BLE001 - any missing-data error: the benchmark still runs
        print(f"note: benchmark data not found ({exc}); synthetic prompts", file=sys.stderr)
        labels = ["Company", "Artist", "Athlete", "Building"]
        make = lambda i: Example(build_prompt(f"Title: item {i}. " + "text " * (10 + i % 30), "dbpedia", "TC",  # noqa: E731
                                              "What is the topic?\n", labels), labels[i % 4])
        return [make(i) for i in range(n_train)], Task("dbpedia", labels, [], [make(i) for i in range(n_test)])


# ------------------------------------------------------------------------------------------ the limit
def matmul_flops(shape: tuple[int, int, int], dtype: torch.dtype, seconds: float) -> float:
    """FLOP/s of [m, k] @ [k, n] repeated for about `seconds` (after a warm-up)."""
    m, k, n = shape
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(2):
        a @ b
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
    return 2 * m * k * n * count / (time.perf_counter() - t0)


def forward_flops_per_token(model, context: int) -> float:
    """2 × the block linears' parameters + attention scores and values (4 × layers × context × hidden)."""
    cfg = model.config
    linear = sum(m.weight.numel() for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and "lm_head" not in name)
    return 2.0 * linear + 4.0 * cfg.num_hidden_layers * context * cfg.hidden_size


# ------------------------------------------------------------------------------------------ paths
def train_setup(model_name: str, method_name: str, with_migu: bool, precision: str):
    cfg = load_config(None, [f"method.name={method_name}"])
    method = get_method(method_name)(cfg.method_options)
    model, tok = load_model_and_tokenizer(model_name)
    set_attention(model, distributed.resolve_attention("auto", torch.device("cpu"), precision))  # the runner's
    model = method.setup(model)
    model.train()
    params = method.trainable_parameters(model)
    optimizer = adamw(params, 1e-5, 0.0)
    migu = MIGU(model, threshold=0.7, target_modules=method.migu_target_modules()) if with_migu else None
    runner = distributed.StepRunner(model, torch.device("cpu"), precision)

    def step(batch):
        step_loss(model, [batch], runner=runner)
        if migu is not None:
            migu.mask_gradients()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        runner.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
        if migu is not None:
            migu.reset()

    return step, tok


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleave_all(fns: dict, repeats: int, warm_up: bool = True) -> dict:
    """Median seconds of each callable, run round-robin A B C … then … C B A (after one warm-up call each)."""
    if warm_up:
        for fn in fns.values():
            fn()
    times = {key: [] for key in fns}
    for r in range(repeats):
        for key in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            times[key].append(timed(fns[key]))
    return {key: statistics.median(t) for key, t in times.items()}


def interleave(naive, default, repeats: int, warm_up: bool = True) -> tuple[float, float]:
    """Median seconds of two callables, run A B B A …"""
    t = interleave_all({"naive": naive, "default": default}, repeats, warm_up)
    return t["naive"], t["default"]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--quick", action="store_true", help="a few steps and examples (a smoke check, not a measurement)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--repeats", type=int, default=None, help="timed runs per path (default 5, quick 1)")
    p.add_argument("--eval-examples", type=int, default=None, help="test examples (default 32, quick 8)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (1 if args.quick else 5)
    n_eval = args.eval_examples or (8 if args.quick else 32)
    precision = distributed.resolve_precision("auto", torch.device("cpu"))
    train_examples, eval_task = load_examples(args.batch_size, n_eval)

    model, tok = load_model_and_tokenizer(args.model)
    items = encode(tok, train_examples[:args.batch_size], args.max_length)
    batch = collate(items, tok.pad_token_id)
    tokens_per_example = float(batch["attention_mask"].sum()) / batch["input_ids"].shape[0]
    per_token = forward_flops_per_token(model, int(tokens_per_example))
    hidden, inter = model.config.hidden_size, getattr(model.config, "intermediate_size", 4 * model.config.hidden_size)
    shape = (args.batch_size * args.max_length, hidden, inter)
    seconds = 0.2 if args.quick else 2.0
    limit = {"shape": list(shape), "matmul_flops_fp32": matmul_flops(shape, torch.float32, seconds),
             "matmul_flops_bf16": matmul_flops(shape, torch.bfloat16, seconds)}
    limit_of = {"fp32": limit["matmul_flops_fp32"], "bf16": limit["matmul_flops_bf16"]}

    paths = {}
    for method_name in dict.fromkeys(m for _, m, _ in TRAIN_PATHS):
        # the four steps of one method (fp32 / default precision, without / with MIGU) interleaved together,
        # so the speed-up and MIGU's overhead are both ratios of neighbouring measurements
        keys = [(key, with_migu) for key, m, with_migu in TRAIN_PATHS if m == method_name]
        steps = {(key, side): train_setup(args.model, method_name, with_migu, prec)[0]
                 for key, with_migu in keys for side, prec in (("naive", "fp32"), ("default", precision))}
        t = interleave_all({k: (lambda f=f: f(batch)) for k, f in steps.items()}, repeats)
        for key, _ in keys:
            paths[key] = {"examples": args.batch_size, "naive_s": t[(key, "naive")], "default_s": t[(key, "default")],
                          "flops_per_example": 3.0 * per_token * tokens_per_example}
        del steps

    model.eval()
    plain_kernel = model.config._attn_implementation  # the model's own (sdpa), as loaded
    default_kernel = distributed.resolve_attention("auto", torch.device("cpu"), precision)
    prompt_tokens = sum(len(tok(e.prompt)["input_ids"]) for e in eval_task.test) / len(eval_task.test)
    for mode in ("generate", "rank"):
        def naive(mode=mode):
            model.set_attn_implementation(plain_kernel)
            evaluate_task(model, tok, eval_task, mode=mode, batch_size=16, max_length=args.max_length,
                          prefix_cache=False)

        def default(mode=mode):
            set_attention(model, default_kernel)
            with distributed.autocast(torch.device("cpu"), precision):
                evaluate_task(model, tok, eval_task, mode=mode, batch_size=16, max_length=args.max_length)

        # no warm-up (training warmed the kernels): naive rank on 14 labels takes minutes per call
        t_naive, t_default = interleave(naive, default, max(1, repeats // 2), warm_up=False)
        # the naive path's work: the prompt (once per label in rank mode) plus the answer tokens
        n_labels = len(eval_task.labels) if mode == "rank" else 1
        paths[f"eval_{mode}"] = {"examples": len(eval_task.test), "naive_s": t_naive, "default_s": t_default,
                                 "flops_per_example": per_token * (prompt_tokens + 4) * n_labels}

    for key, row in paths.items():
        row["naive_examples_per_s"] = row["examples"] / row["naive_s"]
        row["default_examples_per_s"] = row["examples"] / row["default_s"]
        row["speedup"] = row["default_examples_per_s"] / row["naive_examples_per_s"]
        row["naive_fraction_of_limit"] = row["naive_examples_per_s"] * row["flops_per_example"] / limit_of["fp32"]
        row["default_fraction_of_limit"] = (row["default_examples_per_s"] * row["flops_per_example"]
                                            / limit_of[precision])
    for base in ("train_full_ft", "train_lora"):  # MIGU's step overhead under each path
        for side in ("naive", "default"):
            paths[base + "_migu"][f"{side}_migu_overhead"] = paths[base + "_migu"][f"{side}_s"] / paths[base][f"{side}_s"]

    from migu.provenance import machine

    result = {"precision": precision, "quick": args.quick, "repeats": repeats, "threads": torch.get_num_threads(),
              "batch_size": args.batch_size, "max_length": args.max_length, "machine": machine(),
              "model": {"name": args.model, "tokens_per_train_example": tokens_per_example,
                        "prompt_tokens_per_eval_example": prompt_tokens, "flops_per_token_forward": per_token},
              "limit": limit, "paths": paths}
    out = Path(args.out) if args.out else ROOT / "results" / "throughput" / f"throughput-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"wrote {out}")
    return result


def table(result: dict) -> str:
    lines = [f"precision (default path): {result['precision']}; matmul limit fp32 "
             f"{result['limit']['matmul_flops_fp32'] / 1e9:.1f} GFLOP/s, bf16 {result['limit']['matmul_flops_bf16'] / 1e9:.1f} GFLOP/s",
             f"{'path':<22}{'naive ex/s':>12}{'default ex/s':>14}{'speedup':>9}{'naive/limit':>13}{'default/limit':>15}"]
    for key, row in result["paths"].items():
        lines.append(f"{key:<22}{row['naive_examples_per_s']:>12.2f}{row['default_examples_per_s']:>14.2f}"
                     f"{row['speedup']:>9.2f}{row['naive_fraction_of_limit']:>13.2f}{row['default_fraction_of_limit']:>15.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
