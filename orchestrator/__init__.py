"""streamssl orchestration: spec, data, streams, Ray Train/Data/Tune and MLflow lineage."""
