"""The learning-quality floor: the demo's recipe at a small size must reach a held-out macro F1 floor.

tests/test_demo.py checks that every step of the demo runs and leaves well-formed outputs; this test checks
that the model learns: `bench/quality_floor.py`'s `run_recipe` (synthetic data with a held-out test part ->
the Beam preprocessing job -> the training job with the `cpu-small` preset -> thresholds -> prediction with
TTA -> score against the hidden answers, each step the command's own code) must reach FLOOR. The floor, the
spread over seeds it comes from and the planted bugs it catches are in docs/quality.md
(`python bench/quality_floor.py --seeds 0 1 2 3 4 --plant labels_shifted --plant stains_swapped`).
"""

from __future__ import annotations

import pytest

from bench import quality_floor


@pytest.mark.slow
def test_the_demo_recipe_reaches_the_quality_floor(tmp_path):
    result = quality_floor.run_recipe(str(tmp_path), quality_floor.FloorConfig())
    assert result["epochs_run"] >= 1
    assert result["macro_f1"] >= quality_floor.FLOOR, (
        f"held-out macro F1 {result['macro_f1']:.4f} is below the floor {quality_floor.FLOOR} "
        f"(docs/quality.md): a change broke learning somewhere between the data and the score; {result}"
    )


def test_planted_bugs_are_known_and_an_unknown_one_is_refused(tmp_path):
    assert set(quality_floor.PLANTS) == {"labels_shifted", "stains_swapped", "augment_at_inference"}
    with pytest.raises(ValueError, match="unknown plant"):
        quality_floor.run_recipe(str(tmp_path), plant="no_such_bug")
