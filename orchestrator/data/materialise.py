"""A run's data step: make what the spec names exist before anything is planned (planning only reads).

    materialise(spec)      # the synthetic set at data.url when the spec asks for one; ImageFolder downstream sets

`streamssl run` (and `streamssl sweep`, once before its trials race to) call it; `--dry-run` does not, so a dry run
never writes: it plans from what is already there, and says what is missing.
"""

from __future__ import annotations

from orchestrator import storage
from orchestrator.data.downstream import prepare_downstream
from orchestrator.data.synth import generate_synthetic


def materialise(spec, progress: bool = True) -> None:
    """Generate the synthetic set at `data.url` when `data.synthetic` is set and it is not there yet, and prepare
    every ImageFolder `eval.downstream` entry into shards."""
    url, options = spec.data.url, spec.data.storage_options
    if spec.data.synthetic is not None and not storage.exists(storage.join(url, "manifest.json"), options):
        s = spec.data.synthetic
        generate_synthetic(
            url, train=s.train, val=s.val, image_size=s.image_size, groups=s.groups,
            classes_per_group=s.classes_per_group, domains=s.domains, seed=s.seed,
            storage_options=options, progress=progress,
        )
    prepare_downstream(spec, progress=progress)
