"""Barlow Twins self-supervised pretraining (phase 1 of BarlowTwins-CXR).

``barlow``: model and loss; ``lars``: optimizer and learning-rate schedule; ``augment``: the two-view
augmentations on uint8 tensors; ``data``: the NIH cache dataset and a resumable sampler;
``distributed``: process-group setup and batch norm synchronised across ranks; ``train``: the
training loop with atomic, resumable checkpoints and the backbone export.
"""
