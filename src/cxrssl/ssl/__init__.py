"""Self-supervised pretraining on the NIH images, one module per method.

``registry``: the method interface and registry (``methods/``: ``barlowtwins``, ``vicreg``,
``gmml``); ``joint``: what the two-view methods share; ``lars``: LARS and its schedule;
``augment``: the two-view augmentations on uint8 tensors; ``data``: the NIH cache dataset and a
resumable sampler; ``train``: the shared training loop with atomic, resumable checkpoints and the
backbone export (:mod:`cxrssl.models.backbones`). Process groups, RNG state, fingerprints and
checkpoint files are :mod:`cxrssl.runtime`'s.
"""
