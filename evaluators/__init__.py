"""Plain-PyTorch evaluation: features, kNN, linear probe, continual metrics, reports. No Ray, no MLflow."""
