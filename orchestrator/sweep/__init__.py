"""Ray Tune sweeps over a spec (`streamssl sweep`): the space, one trial per point running the same driver as
`streamssl run` (`run.launch`), ASHA on the per-chunk scores, and the sweep's record in MLflow.

May import every stage below it (`spec`, `data`, `plan`, `train`, `run`, `tracking`); never `lineage` or `report/`.
"""
