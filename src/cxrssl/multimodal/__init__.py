"""Image-report multimodal pretraining and annotation-free lesion localisation (arXiv 2401.01524).

* :mod:`~cxrssl.multimodal.reports`: IU X-ray and MIMIC-CXR reports -> (report, frontal image) pairs.
* :mod:`~cxrssl.multimodal.text`: a Hugging Face BERT-style text encoder (any name or local path,
  or a small BERT from scratch with a WordPiece vocabulary of the training reports); sentence
  embeddings from the sentence's token embeddings.
* :mod:`~cxrssl.multimodal.image`: a backbone's feature map -> global vector and region features.
* :mod:`~cxrssl.multimodal.losses`: global image<->report InfoNCE and local sentence<->region
  contrastive alignment, both directions, negatives from every DDP rank.
* :mod:`~cxrssl.multimodal.train`: the method (modules, parameter groups, loss of a batch) and its
  resumable DDP training loop; the image encoder is exported as a torchvision state dict.
* :mod:`~cxrssl.multimodal.localize`: similarity maps as heatmaps, scored against NIH / RSNA boxes.
"""
