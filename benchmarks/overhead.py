"""MIGU overhead per training step, full fine-tuning and LoRA, measured side by side in one process.

    python benchmarks/overhead.py                      # embedded SmolLM2-135M, batch 8 × 128 tokens
    python benchmarks/overhead.py --random --repeats 3 # same-shape random model (no embedded wheel needed)
    python benchmarks/overhead.py --precision bf16 --out results/overhead/overhead-bf16.json  # the runner's default here

Steps with and without MIGU are interleaved (A B B A ...) on the same model so that machine noise hits
both conditions alike. Each step records wall time and the process's CPU time; the CPU-time ratio
median(with) / median(without) is the headline because it is robust to other processes sharing the cores
(wall-time ratios are reported beside it). Writes JSON
``{"full_ft_ratio", "lora_ratio", "extra_bytes", ...}`` to ``--out``.
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


def load(random_init: bool):
    from transformers import AutoConfig, AutoModelForCausalLM

    from migu.models import embedded_model_path

    if random_init:
        from transformers import LlamaConfig

        # SmolLM2-135M's shape, so the timing is representative without the weights
        cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
        return AutoModelForCausalLM.from_config(cfg), "random SmolLM2-135M-shaped"
    path = embedded_model_path()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), str(AutoConfig.from_pretrained(path)._name_or_path or path)


def step_fn(model, params, batch, migu, precision="fp32"):
    opt = torch.optim.AdamW(params, lr=1e-5)

    def step():
        t0, c0 = time.perf_counter(), time.process_time()
        # bf16: autocast as the runner's `train.precision: bf16` (fp32 weights, optimizer and MIGU statistics)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(**batch, labels=batch["input_ids"])
        out.loss.backward()
        if migu is not None and migu.enabled:
            migu.mask_gradients()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if migu is not None and migu.enabled:
            migu.reset()
        return time.perf_counter() - t0, time.process_time() - c0

    return step


def measure(model, params, batch, repeats, threshold, precision="fp32"):
    migu = MIGU(model, threshold=threshold)
    step = step_fn(model, params, batch, migu, precision)
    times = {"plain": [], "migu": []}
    cpu = {"plain": [], "migu": []}
    migu.enabled = False
    step()  # warm-up (allocator, optimizer state)
    order = ["plain", "migu", "migu", "plain"]
    for r in range(repeats):
        for cond in order if r % 2 == 0 else order[::-1]:
            migu.enabled = cond == "migu"
            wall, used = step()
            times[cond].append(wall)
            cpu[cond].append(used)
    extra = migu.extra_bytes()
    units = sum(u.size for u in migu.units)
    migu.remove()
    med = statistics.median
    ratio = med(cpu["migu"]) / med(cpu["plain"])
    wall_ratio = med(times["migu"]) / med(times["plain"])
    return ratio, {"wall": times, "cpu": cpu, "wall_ratio": wall_ratio}, extra, units, len(migu.units)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--repeats", type=int, default=4, help="rounds; each round runs 2 steps per condition")
    p.add_argument("--threshold", type=float, default=0.7)
    p.add_argument("--random", action="store_true", help="use a same-shape random model")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: the step under bf16 autocast")
    p.add_argument("--out", default="results/overhead/overhead.json")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model, name = load(args.random)
    model.train()
    batch = {"input_ids": torch.randint(0, model.config.vocab_size, (args.batch, args.length)),
             "attention_mask": torch.ones(args.batch, args.length, dtype=torch.long)}

    result = {"model": name, "batch": args.batch, "length": args.length, "threshold": args.threshold,
              "repeats": args.repeats, "precision": args.precision, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"}
    ratio, times, extra, units, layers = measure(model, list(model.parameters()), batch, args.repeats, args.threshold,
                                                   args.precision)
    result.update(full_ft_ratio=ratio, full_ft_times=times, extra_bytes=extra, full_ft_units=units,
                  full_ft_layers=layers, bound_bytes=4 * units + 8 * layers)
    print(f"full FT: ×{ratio:.3f} CPU time (×{times['wall_ratio']:.3f} wall), "
          f"MIGU state {extra / 1e3:.1f} kB for {units} units")

    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]))
    params = [q for q in lora.parameters() if q.requires_grad]
    ratio, times, extra, units, layers = measure(lora, params, batch, args.repeats, args.threshold, args.precision)
    result.update(lora_ratio=ratio, lora_times=times, lora_extra_bytes=extra, lora_units=units, lora_layers=layers)
    print(f"LoRA:    ×{ratio:.3f} CPU time (×{times['wall_ratio']:.3f} wall), "
          f"MIGU state {extra / 1e3:.1f} kB for {units} units")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
