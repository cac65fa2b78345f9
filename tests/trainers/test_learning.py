"""Pre-training learns: on the synthetic set, kNN accuracy after a short run of each method beats the same backbone
at its random initialisation by a clear margin (fixed seeds; CPU, ~30 s each). Other methods' learning tests live
in their own test files and use the same helper."""

from __future__ import annotations

import pytest

from tests.trainers.learning_helpers import short_pretraining


@pytest.mark.slow  # a real pre-training of tens of steps and two kNN evaluations: out of the unit loop
def test_short_simclr_pretraining_beats_random_init(tmp_path) -> None:
    random_init, trained, report = short_pretraining(tmp_path, "simclr", {"proj_hidden": 512})
    assert report.losses[-1] < report.losses[0] - 1.0
    # 12 classes: chance is 0.083. Measured: random init 0.09, after 160 steps 0.22.
    assert trained > random_init + 0.08, (random_init, trained)
    assert trained > 1.8 * random_init, (random_init, trained)


@pytest.mark.slow  # a real pre-training of tens of steps and two kNN evaluations: out of the unit loop
def test_short_byol_pretraining_beats_random_init(tmp_path) -> None:
    """BYOL with its defaults (base momentum 0.99 rising to 1 over the line, applied by the engine once per line)."""
    random_init, trained, report = short_pretraining(tmp_path, "byol",
                                                     {"proj_hidden": 512, "pred_hidden": 512, "proj_out": 128})
    assert report.losses[-1] < report.losses[0] - 0.5
    # Measured: random init 0.085, after 140 steps 0.27 (SimCLR's test: 0.22).
    assert trained > random_init + 0.1, (random_init, trained)
