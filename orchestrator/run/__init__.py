"""A run (stage 5): the drivers that turn a plan into Ray Train work, evaluations and MLflow runs; `launch` picks
the chunked or the online driver, `base` is what both share, `recovery` resumes a record, `summary`/`display` end it.

May import every stage below it (`spec`, `data`, `plan`, `train`, `evaluate`, `tracking`); never `sweep/`,
`lineage` or `report/`, which sit above it.
"""
