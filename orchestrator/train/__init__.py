"""Ray Train (stage 4): the worker groups that pre-train a plan's lines chunk by chunk (`runner`) or over a stream
(`online_runner`), their checkpoints on storage, Ray's start-up, and what a chunk's training cost (`accounting`).

May import `spec`, `plan`, `data` (the pipelines it trains on), `storage` and the trainers; never `evaluate/`,
`run/`, `tracking/` or MLflow: it sends events, and the driver logs them.
"""
