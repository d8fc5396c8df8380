"""hpa-doctor on a machine without a GPU: one line and exit 2, or with --allow_cpu the same checks on the CPU
at a tiny size, saying plainly that no GPU was found."""

from __future__ import annotations

from model import doctor


def test_without_a_gpu_it_stops_in_one_line(capsys):
    assert doctor.main(["--presets", "cpu-small"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hpa-doctor: error: no GPU is visible") and "--allow_cpu" in err and "\n" not in err


def test_allow_cpu_runs_every_check_at_a_tiny_size(capsys):
    argv = [
        "--allow_cpu",
        "--presets",
        "cpu-small",
        "--steps",
        "3",
        "--image_size",
        "16",
        "--batch_size",
        "2",
    ]
    assert doctor.main(argv) == 0
    out = capsys.readouterr().out
    assert "NO GPU FOUND" in out and "on the CPU at 16 px, batch 2" in out
    assert "preset cpu-small: small at 16 px, batch 2, float32, XLA off" in out
    assert "samples/s (steps after the first)" in out and "peak resident memory" in out
    # The augmentation is traced as a GPU host runs it: no op leaves the GPU.
    assert "device placement: every op of the training step has a GPU kernel" in out
    assert "input pipeline (decoded, cached in memory, shuffled, batched)" in out
