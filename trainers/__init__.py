"""Plain-PyTorch training pieces: backbones, views, SSL methods, strategies, the per-worker loop. No Ray, no MLflow."""
