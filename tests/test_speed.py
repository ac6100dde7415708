"""Speed features: `train.precision: auto` (resolution and recording) and the throughput benchmark's quick mode."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from migu import devices, distributed
from migu.config import load_config
from tests.runner_helpers import tiny_config, write_stream

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("flags, mkldnn, expected", [
    ({"avx2", "avx512f", "avx512_bf16"}, True, True),
    ({"avx2", "amx_bf16", "amx_tile"}, True, True),
    ({"avx2", "avx512f", "avx512bw"}, True, False),  # plain AVX-512: oneDNN emulates bf16, slower than fp32
    ({"avx2"}, True, False),
    ({"avx512_bf16"}, False, False),  # no oneDNN bf16 path in this torch build
    (set(), False, False),
])
def test_cpu_bf16_detection(flags, mkldnn, expected):
    assert distributed.cpu_has_bf16(flags, mkldnn) is expected


def test_resolve_precision_on_mocked_capabilities():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert distributed.resolve_precision("auto", cpu, cpu_bf16=True) == "bf16"
    assert distributed.resolve_precision("auto", cpu, cpu_bf16=False) == "fp32"
    assert distributed.resolve_precision("auto", cuda, cuda_bf16=True) == "bf16"
    assert distributed.resolve_precision("auto", cuda, cuda_bf16=False) == "fp32"
    for fixed in ("fp32", "bf16", "fp16"):  # explicit settings are never changed
        assert distributed.resolve_precision(fixed, cpu, cpu_bf16=True) == fixed
    assert load_config(None, []).train.precision == "auto"  # the default


def test_resolve_attention():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert distributed.resolve_attention("auto", cpu, "bf16") == "eager"  # CPU flash-attention backward is slow
    assert distributed.resolve_attention("auto", cpu, "fp32") is None  # the model's own default
    assert distributed.resolve_attention("auto", cuda, "bf16") is None
    assert distributed.resolve_attention("sdpa", cpu, "bf16") == "sdpa"  # explicit settings are kept
    assert load_config(None, []).model.attention == "auto"


@pytest.mark.parametrize("has_bf16, expected, attention", [(True, "bf16", "eager"), (False, "fp32", "sdpa")])
def test_resolved_precision_is_recorded_and_used_by_evaluation(tmp_path, tiny_llama_dir, monkeypatch, has_bf16,
                                                               expected, attention):
    import migu.train
    from migu.train import run

    monkeypatch.setattr(devices, "cpu_has_bf16", lambda *a, **k: has_bf16)
    seen = []
    real = distributed.autocast
    monkeypatch.setattr(migu.train.distributed, "autocast", lambda device, p: seen.append(p) or real(device, p))
    stream = write_stream(tmp_path / "data", tasks={"colors": ["red", "blue"]})
    out = tmp_path / "run"
    kernels = []
    real_forward = migu.train._Run._train_phase

    def spy(self, *args):
        kernels.append(self.model.config._attn_implementation)
        return real_forward(self, *args)

    monkeypatch.setattr(migu.train._Run, "_train_phase", spy)
    cfg = tiny_config(tiny_llama_dir, stream, out, **{"train.precision": "auto", "train.device": "cpu",
                                                      "data.train_per_task": 4, "eval.untrained": False})
    summary = run(cfg, quiet=True)
    assert summary["precision"] == expected
    assert json.loads((out / "summary.json").read_text())["precision"] == expected
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["train"]["precision"] == expected
    assert seen and set(seen) == {expected}  # evaluation ran under the resolved precision
    # attention auto: eager under bf16 on CPU, the model's sdpa otherwise; recorded and used
    assert summary["attention"] == written["model"]["attention"] == attention and kernels == [attention]


@pytest.mark.parametrize("compare", [False, True])
def test_a_kernel_the_model_lacks_is_a_one_line_error_before_the_run_directory(tmp_path, tiny_llama_dir, compare):
    from migu.models import ModelError
    from migu.train import run

    stream = write_stream(tmp_path / "data", tasks={"colors": ["red", "blue"]})
    out = tmp_path / "run"
    cfg = tiny_config(tiny_llama_dir, stream, out, **{"model.attention": "no_such_kernel", "compare_migu": compare})
    with pytest.raises(ModelError, match=r"^model.attention=no_such_kernel: LlamaForCausalLM cannot use it: ") as err:
        run(cfg, quiet=True)
    assert "\n" not in str(err.value) and not out.exists()


def test_throughput_quick_mode_writes_sane_json(tmp_path, tiny_llama_dir):
    out = tmp_path / "tp.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--quick", "--model",
                           str(tiny_llama_dir), "--out", str(out)], capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["precision"] in ("bf16", "fp32")
    for key in ("train_full_ft", "train_full_ft_migu", "train_lora", "train_lora_migu", "eval_generate",
                "eval_rank"):
        row = data["paths"][key]
        assert row["naive_examples_per_s"] > 0 and row["default_examples_per_s"] > 0, key
        assert row["speedup"] == pytest.approx(row["default_examples_per_s"] / row["naive_examples_per_s"], rel=1e-6)
        for side in ("naive", "default"):
            # examples/s × FLOPs per example / matmul FLOP/s: positive and finite (a tiny model's shapes are
            # overhead-bound, so its fractions mean nothing beyond that)
            assert 0 < row[f"{side}_fraction_of_limit"] < float("inf"), (key, side)
    limit = data["limit"]
    assert limit["matmul_flops_fp32"] > 0 and limit["matmul_flops_bf16"] > 0
    assert data["model"]["flops_per_token_forward"] > 0
    assert "speedup" in proc.stdout  # the printed table


def test_overhead_benchmark_times_migu_without_changing_it(tmp_path, tiny_llama_dir):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import overhead
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from transformers import AutoModelForCausalLM

    from migu import MIGU

    # the timing subclass masks exactly as MIGU does
    masks = []
    for cls in (MIGU, overhead.TimedMIGU):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
        migu = cls(model, threshold=0.7)
        ids = torch.randint(0, model.config.vocab_size, (2, 8))
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
        masks.append(migu.mask_gradients())
    assert masks[0].keys() == masks[1].keys()
    assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])
    assert set(migu.spent) == {"statistics", "mask_gradients", "reset"} and migu.spent["statistics"] > 0

    out = tmp_path / "overhead.json"
    result = overhead.main(["--model", str(tiny_llama_dir), "--repeats", "1", "--batch", "2", "--length", "16",
                            "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["full_ft_ratio"] == pytest.approx(result["full_ft_ratio"]) and data["full_ft_ratio"] > 0
    for prefix in ("full_ft", "lora"):
        assert 0 < data[f"{prefix}_own_share"] < 1 and 0 < data[f"{prefix}_own_wall_share"] < 1, prefix
        times = data[f"{prefix}_times"]
        for own in (times["own_cpu"], times["own_wall"]):
            assert set(own) == {"statistics", "mask_gradients", "reset"} and len(own["statistics"]) == 2  # 2 steps
        # the share is the median own time of a MIGU step over the median plain step
        wall_share = statistics.median(map(sum, zip(*times["own_wall"].values()))) / statistics.median(
            times["wall"]["plain"])
        assert data[f"{prefix}_own_wall_share"] == pytest.approx(wall_share)
    assert data["answer_tokens"] == 3 and data["extra_bytes"] > 0


_FAULTS = """
import os, resource, sys
import migu, torch
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.zeros(32 * 2 ** 20 // 4)  # 32 MB, freshly mapped
print(os.environ["THP_MEM_ALLOC_ENABLE"], resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
"""


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "absent"
    return text.split("[")[1].split("]")[0] if "[" in text else "absent"


@pytest.mark.parametrize("preset, expected", [(None, "1"), ("0", "0")])
def test_importing_migu_turns_on_huge_pages_for_torch_unless_told_not_to(preset, expected):
    import os

    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if preset is not None:
        env["THP_MEM_ALLOC_ENABLE"] = preset
    proc = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    value, faults = proc.stdout.split()
    assert value == expected
    mode = _thp_mode() if sys.platform == "linux" else "absent"
    # 32 MB in 4 KB pages is 8192 faults, in 2 MB huge pages a few dozen; "madvise": only what torch asks for
    if expected == "1" and mode in ("madvise", "always"):
        assert int(faults) < 8192, faults
    if expected == "0" and mode == "madvise":
        assert int(faults) >= 8000, faults
