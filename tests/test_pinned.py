"""Numbers pinned: the tiny run's step losses and accuracy matrix, without and with MIGU.

Other tests compare two runs of the same code with each other, so a change that shifts batch order, loss
scaling, seeding or MIGU's mask in both runs would still pass them. These values were produced by this
code (fp32, 1 thread, tiny random Llama, tests/runner_helpers.py's stream); a change of behaviour breaks
them. If a change is intended, regenerate them and say why in the commit.
"""

import pytest

from migu.train import run
from tests.runner_helpers import final_rows, tiny_config, train_losses, write_stream

# 3 tasks × 3 steps; MIGU (T=0.7, first_task: skip) leaves phase 0 alone, so the first 4 losses agree
LOSSES = {
    False: [5.629211, 5.405408, 5.247083, 5.262648, 5.147773, 4.907436, 5.005096, 4.819636, 4.645558],
    True: [5.629211, 5.405408, 5.247083, 5.262648, 5.15826, 4.92835, 5.02583, 4.846052, 4.678504],
}
R0 = [100 / 6] * 3
ROWS = [[500 / 6, 100 / 6, 100 / 6], [500 / 6, 100 / 6, 100 / 6], [500 / 6, 400 / 6, 100 / 6]]


@pytest.mark.parametrize("migu", [False, True])
def test_tiny_run_losses_and_matrix_are_pinned(tmp_path, tiny_llama_dir, migu):
    stream = write_stream(tmp_path / "data")
    out = tmp_path / "run"
    summary = run(tiny_config(tiny_llama_dir, stream, out, **{"migu.enabled": migu}), quiet=True)
    losses = train_losses(out)
    assert [(stage, step) for stage, step, _ in losses] == [(s, k) for s in range(3) for k in range(1, 4)]
    assert [loss for _, _, loss in losses] == pytest.approx(LOSSES[migu], abs=1e-5)
    assert summary["r0"] == pytest.approx(R0, abs=1e-9)
    assert final_rows(out) == [pytest.approx(row, abs=1e-9) for row in ROWS]
    assert summary["aa"] == pytest.approx((500 + 400 + 100) / 18, abs=1e-9)  # mean of the last row
