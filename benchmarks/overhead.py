"""MIGU overhead per training step, full fine-tuning and LoRA, measured side by side in one process.

    python benchmarks/overhead.py                      # embedded SmolLM2-135M, batch 8 × 128 tokens
    python benchmarks/overhead.py --random --repeats 3 # same-shape random model (no embedded wheel needed)
    python benchmarks/overhead.py --precision bf16 --out results/overhead/overhead-bf16.json  # the runner's default here

Each step is the runner's (`step_loss`: the LM head only at the answer positions; MIGU; clipping; fused AdamW).
Steps with and without MIGU are interleaved (A B B A ...) on the same model so that machine noise hits
both conditions alike. Each step records wall time and the process's CPU time; the CPU-time ratio
median(with) / median(without) is the headline because it is robust to other processes sharing the cores
(wall-time ratios are reported beside it). Beside the ratio, MIGU's own CPU time inside each step (its
forward hooks, `mask_gradients` and `reset`, timed where they run) over the plain step's: on a machine
whose step times vary ±15% between repetitions this share is the stable reading of the overhead (it
leaves out indirect costs, e.g. caches the hooks evict). The same share in wall time (`own_wall_share`) is
what MIGU adds to a step's duration (its parts run inline); it can differ from the CPU share, since idle
OpenMP threads spin through MIGU's serial Python. Writes JSON to ``--out``: ``{"full_ft_ratio",
"full_ft_own_share", "full_ft_own_wall_share", "lora_ratio", "lora_own_share", "lora_own_wall_share",
"extra_bytes", ...}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from migu import MIGU
from migu.distributed import StepRunner, resolve_attention
from migu.models import set_attention
from migu.steps import adamw, step_loss


def load(random_init: bool, model_dir: str | None = None):
    from transformers import AutoConfig, AutoModelForCausalLM

    from migu.models import embedded_model_path

    if random_init:
        from transformers import LlamaConfig

        # SmolLM2-135M's shape, so the timing is representative without the weights
        cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
        return AutoModelForCausalLM.from_config(cfg), "random SmolLM2-135M-shaped"
    path = model_dir or embedded_model_path()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), str(AutoConfig.from_pretrained(path)._name_or_path or path)


class TimedMIGU(MIGU):
    """MIGU whose forward hooks, mask_gradients and reset add their process CPU time to `spent[part]`
    and their wall time to `spent_wall[part]` (they run inline in the step, so wall time is what they add)."""

    PARTS = ("statistics", "mask_gradients", "reset")

    def __init__(self, *args, **kwargs):
        self.spent = dict.fromkeys(self.PARTS, 0.0)
        self.spent_wall = dict.fromkeys(self.PARTS, 0.0)
        super().__init__(*args, **kwargs)

    def _timed(self, part, fn):
        def timed(*args):
            c0, t0 = time.process_time(), time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.spent[part] += time.process_time() - c0
                self.spent_wall[part] += time.perf_counter() - t0
        return timed

    def _make_hook(self, unit):
        return self._timed("statistics", super()._make_hook(unit))

    def mask_gradients(self):
        return self._timed("mask_gradients", super().mask_gradients)()

    def reset(self):
        return self._timed("reset", super().reset)()


def step_fn(model, params, batch, migu, precision="fp32"):
    """The runner's step: answer-token loss (`step_loss`, logits only where an answer is), MIGU, clip, fused AdamW."""
    runner = StepRunner(model, torch.device("cpu"), precision)  # bf16: autocast, fp32 weights and optimizer
    set_attention(model, resolve_attention("auto", torch.device("cpu"), precision))  # the runner's kernel
    opt = adamw(params, 1e-5, 0.0)

    def step():
        t0, c0 = time.perf_counter(), time.process_time()
        step_loss(model, [batch], runner=runner)
        if migu is not None and migu.enabled:
            migu.mask_gradients()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        runner.step(opt)
        opt.zero_grad(set_to_none=True)
        if migu is not None and migu.enabled:
            migu.reset()
        return time.perf_counter() - t0, time.process_time() - c0

    return step


def measure(model, params, batch, repeats, threshold, precision="fp32"):
    migu = TimedMIGU(model, threshold=threshold)
    step = step_fn(model, params, batch, migu, precision)
    times = {"plain": [], "migu": []}
    cpu = {"plain": [], "migu": []}
    own = {part: [] for part in migu.PARTS}  # MIGU's own CPU time in each MIGU step, by part
    own_wall = {part: [] for part in migu.PARTS}
    migu.enabled = False
    step()  # warm-up (allocator, optimizer state)
    order = ["plain", "migu", "migu", "plain"]
    for r in range(repeats):
        for cond in order if r % 2 == 0 else order[::-1]:
            migu.enabled = cond == "migu"
            migu.spent, migu.spent_wall = dict.fromkeys(migu.PARTS, 0.0), dict.fromkeys(migu.PARTS, 0.0)
            wall, used = step()
            times[cond].append(wall)
            cpu[cond].append(used)
            if cond == "migu":
                for part in migu.PARTS:
                    own[part].append(migu.spent[part])
                    own_wall[part].append(migu.spent_wall[part])
    extra = migu.extra_bytes()
    units = sum(u.size for u in migu.units)
    migu.remove()
    med = statistics.median
    ratio = med(cpu["migu"]) / med(cpu["plain"])
    wall_ratio = med(times["migu"]) / med(times["plain"])
    share = med([sum(parts) for parts in zip(*own.values())]) / med(cpu["plain"])
    wall_share = med([sum(parts) for parts in zip(*own_wall.values())]) / med(times["plain"])
    print("  MIGU's own CPU time a step: " + ", ".join(f"{part} {1e3 * med(v):.0f} ms" for part, v in own.items())
          + f" (a step without MIGU: {med(cpu['plain']):.2f} s); own wall time {100 * wall_share:.1f}% of a step")
    return ratio, {"wall": times, "cpu": cpu, "own_cpu": own, "own_wall": own_wall, "wall_ratio": wall_ratio,
                   "own_share": share, "own_wall_share": wall_share}, extra, units, len(migu.units)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--repeats", type=int, default=4, help="rounds; each round runs 2 steps per condition")
    p.add_argument("--answer", type=int, default=3, help="labelled (answer) tokens at the end of each row")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--threshold", type=float, default=0.7)
    p.add_argument("--random", action="store_true", help="use a same-shape random model")
    p.add_argument("--model", default=None, help="an HF causal-LM directory instead of the embedded model (tests)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: the step under bf16 autocast")
    p.add_argument("--out", default="results/overhead/overhead.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, name = load(args.random, args.model)
    model.train()
    input_ids = torch.randint(0, model.config.vocab_size, (args.batch, args.length))
    labels = torch.full_like(input_ids, -100)
    labels[:, -args.answer:] = input_ids[:, -args.answer:]  # a short answer at the end, as a prompt's label
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}

    result = {"model": name, "batch": args.batch, "length": args.length, "answer_tokens": args.answer,
              "threshold": args.threshold,
              "repeats": args.repeats, "precision": args.precision, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"}
    ratio, times, extra, units, layers = measure(model, list(model.parameters()), batch, args.repeats, args.threshold,
                                                   args.precision)
    result.update(full_ft_ratio=ratio, full_ft_own_share=times["own_share"],
                  full_ft_own_wall_share=times["own_wall_share"], full_ft_times=times, extra_bytes=extra,
                  full_ft_units=units, full_ft_layers=layers, bound_bytes=4 * units + 8 * layers)
    print(f"full FT: ×{ratio:.3f} CPU time (×{times['wall_ratio']:.3f} wall; MIGU's own work "
          f"{100 * times['own_share']:.1f}% of a step), "
          f"MIGU state {extra / 1e3:.1f} kB for {units} units")

    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]))
    params = [q for q in lora.parameters() if q.requires_grad]
    ratio, times, extra, units, layers = measure(lora, params, batch, args.repeats, args.threshold, args.precision)
    result.update(lora_ratio=ratio, lora_own_share=times["own_share"], lora_own_wall_share=times["own_wall_share"],
                  lora_times=times, lora_extra_bytes=extra,
                  lora_units=units, lora_layers=layers)
    print(f"LoRA:    ×{ratio:.3f} CPU time (×{times['wall_ratio']:.3f} wall; MIGU's own work "
          f"{100 * times['own_share']:.1f}% of a step), "
          f"MIGU state {extra / 1e3:.1f} kB for {units} units")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
