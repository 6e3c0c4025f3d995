"""Image-report multimodal pretraining and annotation-free lesion localisation (arXiv 2401.01524).

* :mod:`~cxrssl.multimodal.reports`: IU X-ray and MIMIC-CXR reports -> (report, frontal image) pairs,
  quarantine, patient-disjoint splits (:func:`~cxrssl.multimodal.reports.prepare_pairs`).
* :mod:`~cxrssl.multimodal.text`: a Hugging Face BERT-style text encoder (any name or local path,
  or a small BERT from scratch with a WordPiece vocabulary of the training reports); sentence
  embeddings from the sentence's token embeddings, one pass over the report.
* :mod:`~cxrssl.multimodal.image`: any backbone's feature map -> global vector and region features.
* :mod:`~cxrssl.multimodal.losses`: global image<->report InfoNCE and local sentence<->region
  contrastive alignment, both directions, negatives from every DDP rank.
* :mod:`~cxrssl.multimodal.method`: settings, modules, parameter groups, optimizer, the loss of a
  batch, export (torchvision state dict + JSON sidecar) and reload.
* :mod:`~cxrssl.multimodal.data` / :mod:`~cxrssl.multimodal.train`: the pairs as training data and
  the resumable DDP training loop.
* :mod:`~cxrssl.multimodal.localize` / :mod:`~cxrssl.multimodal.zeroshot`: similarity maps as
  heatmaps, scored (IoU, Dice, pointing game, CNR) against NIH / RSNA / MS-CXR boxes beside a
  random-map and a centre-prior baseline, with bootstrap CIs over images; panels per finding.

How a pretraining-method registry wraps it (one thin adapter module)::

    method = MultimodalMethod(settings)            # settings: the future ``pretrain.multimodal`` block
    model = method.build_model(train_texts)        # image side: any FeatureMapBackbone
    opt = method.optimizer(model)                  # method.param_groups(model): text / rest, decay / not
    method.set_lr(opt, step, total_steps, warmup)  # warm-up + cosine per step
    loss, parts = method.batch_loss(net, method.build_loss(), batch, device, amp)
    method.export(model, out_dir)                  # image_encoder.pth + image_encoder.json, model.pth, ...

The data side differs from image-only methods: a batch is ``collate_pairs`` of
:class:`~cxrssl.multimodal.data.ReportImageDataset` items (one view + tokens, no flips), sampled
by :class:`cxrssl.ssl.data.PairSampler`; :func:`~cxrssl.multimodal.train.pretrain_multimodal` is
the whole loop until a shared one takes these hooks.
"""
