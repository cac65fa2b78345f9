"""The view pipeline: from decoded images to the crops a method sees.

Owns JPEG decoding (`decode`), crop sampling and augmentation (`augment`), the per-method view plan (`plan`) and the
crop-overlap bounds (`crop_overlap`). Imports only torch, torchvision and `trainers.registry`; never the engine.
"""
