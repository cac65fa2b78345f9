"""Plain-PyTorch evaluation: features, kNN, linear probe, few-shot, continual metrics, reports, and transfer
(label subsets, fine-tuning, NormRescale, feature reconstruction). No Ray, no MLflow."""
