"""Plain-PyTorch evaluation: features, kNN, linear probe, few-shot, continual metrics, reports, and transfer
(label subsets, fine-tuning, NormRescale, feature reconstruction, detection and instance segmentation with
torchvision's Faster / Mask R-CNN, COCO AP). No Ray, no MLflow."""
