"""From a spec to jobs (stage 3): the stream plan that cuts the data into chunks or stream batches, the data
factors, and the experiment plan's lines and jobs, each with a stable key.

Reads manifests and indexes; writes nothing (`orchestrator.data.materialise` makes the data first). May import
`spec`, `data` (manifests, shards) and `storage`; never Ray, MLflow, `train/`, `evaluate/` or `run/`.
"""
