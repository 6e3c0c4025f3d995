"""The mmdet 3.x config of the mmdet detection engine, as a plain dict (no mmdet import needed).

It is the paper's mmdetection Faster R-CNN R50-FPN setup (REFERENCE.md, phase 2) with the values
taken from the ``detection`` config section:

* SGD (lr, momentum, weight decay); the learning rate of :class:`cxrssl.detection.schedule.WarmupCosine`
  (the paper's: cosine per epoch down to ``min_lr``, ``warmup_iters`` of linear warm-up from 0.001 x
  lr) through the engine's registered ``CxrsslWarmupCosineLR`` scheduler, so both engines step the
  same rates; the best epoch by val bbox mAP50 (kept by the engine, not by mmengine checkpoints).
* Resize to ``(res, res)`` keeping the aspect ratio (longest side ``res``), horizontal flip
  ``hflip``, ImageNet mean/std (BGR -> RGB), pad to a multiple of 32.
* ResNet ``frozen_stages`` and ``norm_eval`` for pretrained backbones (``init_cfg`` Pretrained loads
  the checkpoint unchanged: mmdet's ResNet uses torchvision's parameter names).
* The random-init arm freezes nothing and keeps its normalisation trainable: BatchNorm in train
  mode, or GroupNorm(32) in the backbone with ``random_init_norm: groupnorm``. The paper's scratch
  arm was mmdet's GN-everywhere config; like the torchvision engine we keep the neck and heads of
  the other arms so the comparison is between initialisations only.
* The class table is :data:`cxrssl.classes.VINDR_CLASSES` as dataset ``metainfo``; the engine checks
  the COCO JSON categories against it before training (mmdet maps categories by *name*; a spelling
  difference silently drops a class, which is what happened in the original study).
* Training images: mmdet's ``filter_cfg`` with ``filter_empty_gt = not train_on_empty`` and
  ``min_size`` :data:`cxrssl.detection.dataset.TRAIN_MIN_SIZE`, the rule the torchvision engine
  applies too (:func:`cxrssl.detection.dataset.training_image_ids`); val/test keep every image.
* ``rpn_proposals`` is the RPN's ``max_per_img`` in training and testing, ``rois_per_image`` the RoI
  sampler's ``num``, ``fpn_channels`` the width of the neck, the RPN head and the RoI features:
  the same numbers the torchvision engine uses.
* Precision: the detector type is the engine's ``CxrsslFasterRCNN`` (mmdet's FasterRCNN whose
  backbone + neck run under bf16 autocast on ``autocast_device``, the heads in fp32), as the
  torchvision engine; the optimizer wrapper is a plain ``OptimWrapper`` (bf16 needs no loss scale).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cxrssl.classes import VINDR_CLASSES
from cxrssl.detection.dataset import TRAIN_MIN_SIZE

#: mmdet ResNet depth and FPN input widths per backbone arch.
RESNET_DEPTH = {"resnet18": 18, "resnet34": 34, "resnet50": 50}
FPN_IN_CHANNELS = {
    "resnet18": [64, 128, 256, 512],
    "resnet34": [64, 128, 256, 512],
    "resnet50": [256, 512, 1024, 2048],
}
IMAGENET_MEAN_255 = [123.675, 116.28, 103.53]
IMAGENET_STD_255 = [58.395, 57.12, 57.375]
BEST_METRIC = "coco/bbox_mAP_50"
GROUPNORM_GROUPS = 32
#: Types the engine registers (cxrssl.detection.mmdet_engine): mixed-precision detector, LR schedule.
DETECTOR_TYPE = "CxrsslFasterRCNN"
SCHEDULER_TYPE = "CxrsslWarmupCosineLR"


def backbone_cfg(arch: str, checkpoint: str | None, frozen_stages: int, norm_eval: bool,
                 random_init_norm: str, pretrained: bool | None = None) -> dict[str, Any]:
    """mmdet ResNet settings. ``pretrained`` (default: a ``checkpoint`` is given) selects the
    pretrained arm's architecture; ``checkpoint`` None with ``pretrained`` rebuilds that arm without
    loading any weights (a trained checkpoint follows)."""
    if arch not in RESNET_DEPTH:
        raise ValueError(f"unknown arch {arch!r}; expected one of {tuple(RESNET_DEPTH)}")
    if pretrained is None:
        pretrained = checkpoint is not None
    if not pretrained:
        if random_init_norm == "groupnorm":
            norm_cfg = dict(type="GN", num_groups=GROUPNORM_GROUPS, requires_grad=True)
        elif random_init_norm == "batchnorm":
            norm_cfg = dict(type="BN", requires_grad=True)
        else:
            raise ValueError(f"random_init_norm must be batchnorm or groupnorm, got {random_init_norm!r}")
        frozen, neval, init_cfg = -1, False, None
    else:
        norm_cfg = dict(type="BN", requires_grad=True)
        frozen, neval = int(frozen_stages), bool(norm_eval)
        init_cfg = dict(type="Pretrained", checkpoint=str(checkpoint)) if checkpoint is not None else None
    return dict(
        type="ResNet",
        depth=RESNET_DEPTH[arch],
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        frozen_stages=frozen,
        norm_cfg=norm_cfg,
        norm_eval=neval,
        style="pytorch",
        init_cfg=init_cfg,
    )


def model_cfg(arch: str, checkpoint: str | None, params: Mapping[str, Any], pretrained: bool | None = None,
              autocast_device: str | None = None) -> dict[str, Any]:
    """Faster R-CNN R-FPN as mmdet's ``faster-rcnn_r50_fpn.py`` with 14 classes (plain data: the
    engine rebuilds a trained network from this and a checkpoint's JSON meta)."""
    proposals, rois = int(params["rpn_proposals"]), int(params["rois_per_image"])
    channels = int(params["fpn_channels"])
    return dict(
        type=DETECTOR_TYPE,
        autocast_device=autocast_device,
        data_preprocessor=dict(
            type="DetDataPreprocessor",
            mean=IMAGENET_MEAN_255,
            std=IMAGENET_STD_255,
            bgr_to_rgb=True,
            pad_size_divisor=32,
        ),
        backbone=backbone_cfg(arch, checkpoint, params["frozen_stages"], params["norm_eval"],
                              params["random_init_norm"], pretrained),
        neck=dict(type="FPN", in_channels=FPN_IN_CHANNELS[arch], out_channels=channels, num_outs=5),
        rpn_head=dict(
            type="RPNHead",
            in_channels=channels,
            feat_channels=channels,
            anchor_generator=dict(type="AnchorGenerator", scales=[8], ratios=[0.5, 1.0, 2.0],
                                  strides=[4, 8, 16, 32, 64]),
            bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[1.0] * 4),
            loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0),
            loss_bbox=dict(type="L1Loss", loss_weight=1.0),
        ),
        roi_head=dict(
            type="StandardRoIHead",
            bbox_roi_extractor=dict(
                type="SingleRoIExtractor",
                roi_layer=dict(type="RoIAlign", output_size=7, sampling_ratio=0),
                out_channels=channels,
                featmap_strides=[4, 8, 16, 32],
            ),
            bbox_head=dict(
                type="Shared2FCBBoxHead",
                in_channels=channels,
                fc_out_channels=1024,
                roi_feat_size=7,
                num_classes=len(VINDR_CLASSES),
                bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4,
                                target_stds=[0.1, 0.1, 0.2, 0.2]),
                reg_class_agnostic=False,
                loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
                loss_bbox=dict(type="L1Loss", loss_weight=1.0),
            ),
        ),
        train_cfg=dict(
            rpn=dict(
                assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3,
                              match_low_quality=True, ignore_iof_thr=-1),
                sampler=dict(type="RandomSampler", num=256, pos_fraction=0.5, neg_pos_ub=-1,
                             add_gt_as_proposals=False),
                allowed_border=-1,
                pos_weight=-1,
                debug=False,
            ),
            rpn_proposal=dict(nms_pre=2000, max_per_img=proposals, nms=dict(type="nms", iou_threshold=0.7),
                              min_bbox_size=0),
            rcnn=dict(
                assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5,
                              match_low_quality=False, ignore_iof_thr=-1),
                sampler=dict(type="RandomSampler", num=rois, pos_fraction=0.25, neg_pos_ub=-1,
                             add_gt_as_proposals=True),
                pos_weight=-1,
                debug=False,
            ),
        ),
        test_cfg=dict(
            rpn=dict(nms_pre=1000, max_per_img=proposals, nms=dict(type="nms", iou_threshold=0.7), min_bbox_size=0),
            # score_thr low (0.001) so mAP sees the whole precision-recall curve; 100 boxes per image.
            rcnn=dict(score_thr=float(params["score_thr"]), nms=dict(type="nms", iou_threshold=0.5),
                      max_per_img=100),
        ),
    )


def _dataset(json_path: Path, pipeline: list, train: bool, train_on_empty: bool = True) -> dict[str, Any]:
    # file_name in the pipeline's COCO JSON is relative to the JSON's folder.
    return dict(
        type="CocoDataset",
        data_root=str(json_path.parent),
        ann_file=json_path.name,
        data_prefix=dict(img=""),
        metainfo=dict(classes=tuple(VINDR_CLASSES)),
        filter_cfg=dict(filter_empty_gt=train and not train_on_empty, min_size=TRAIN_MIN_SIZE if train else 0),
        test_mode=not train,
        pipeline=pipeline,
        backend_args=None,
    )


def _loader(dataset: dict, batch_size: int, workers: int, train: bool) -> dict[str, Any]:
    out = dict(
        batch_size=batch_size,
        num_workers=workers,
        persistent_workers=workers > 0,
        sampler=dict(type="DefaultSampler", shuffle=train),
        dataset=dataset,
    )
    if train:
        out["batch_sampler"] = dict(type="AspectRatioBatchSampler")
    else:
        out["drop_last"] = False
    return out


def build_config(params: Mapping[str, Any], *, train_json: str | Path, val_json: str | Path,
                 test_json: str | Path, work_dir: str | Path, res: int, backbone_checkpoint: str | None,
                 seed: int, device_type: str = "cpu", predictions_prefix: str | Path | None = None,
                 log_interval: int = 50) -> dict[str, Any]:
    """Full mmengine Runner config for one detection run.

    ``params`` is the ``detection`` config section (schema keys). ``backbone_checkpoint`` is the
    backbone's init: None (random) or a torchvision-format ResNet state dict path/URL.
    ``device_type`` is where it trains (bf16 autocast of the backbone on ``cuda`` when ``amp``).
    ``predictions_prefix``: where the test run writes ``<prefix>.bbox.json`` (COCO results).
    """
    from cxrssl.detection.model import autocast_device_for  # the policy both engines follow

    train_json, val_json, test_json = Path(train_json), Path(val_json), Path(test_json)
    work_dir = Path(work_dir)
    prefix = Path(predictions_prefix) if predictions_prefix else work_dir / "test_predictions"
    epochs = int(params["epochs"])
    scale = (int(res), int(res))
    train_pipeline = [
        dict(type="LoadImageFromFile", backend_args=None),  # grey PNG -> 3 equal channels
        dict(type="LoadAnnotations", with_bbox=True),
        dict(type="Resize", scale=scale, keep_ratio=True),
        dict(type="RandomFlip", prob=float(params["hflip"])),
        dict(type="PackDetInputs"),
    ]
    test_pipeline = [
        dict(type="LoadImageFromFile", backend_args=None),
        dict(type="Resize", scale=scale, keep_ratio=True),
        dict(type="LoadAnnotations", with_bbox=True),
        dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
    ]
    workers, batch = int(params["workers"]), int(params["batch_size"])

    optimizer = dict(type="SGD", lr=float(params["lr"]), momentum=float(params["momentum"]),
                     weight_decay=float(params["weight_decay"]))
    optim_wrapper = dict(type="OptimWrapper", optimizer=optimizer)
    if float(params.get("grad_clip", 0) or 0) > 0:
        optim_wrapper["clip_grad"] = dict(max_norm=float(params["grad_clip"]), norm_type=2)
    # One scheduler for warm-up and cosine: the closed form of cxrssl.detection.schedule, per iteration
    # (epoch-based in the config so that mmengine hands it the epoch length).
    schedulers = [dict(type=SCHEDULER_TYPE, lr=float(params["lr"]), min_lr=float(params["min_lr"]),
                       warmup_iters=int(params["warmup_iters"]), epochs=epochs, begin=0, end=epochs,
                       by_epoch=True, convert_to_iter_based=True)]
    autocast = autocast_device_for(device_type, bool(params["amp"]))

    return dict(
        default_scope="mmdet",
        work_dir=str(work_dir),
        model=model_cfg(params["arch"], backbone_checkpoint, params, autocast_device=autocast),
        train_dataloader=_loader(_dataset(train_json, train_pipeline, train=True,
                                          train_on_empty=bool(params["train_on_empty"])), batch, workers, train=True),
        val_dataloader=_loader(_dataset(val_json, test_pipeline, train=False), 1, workers, train=False),
        test_dataloader=_loader(_dataset(test_json, test_pipeline, train=False), 1, workers, train=False),
        val_evaluator=dict(type="CocoMetric", ann_file=str(val_json), metric="bbox", format_only=False,
                           backend_args=None),
        test_evaluator=dict(type="CocoMetric", ann_file=str(test_json), metric="bbox", format_only=True,
                            outfile_prefix=str(prefix), backend_args=None),
        train_cfg=dict(type="EpochBasedTrainLoop", max_epochs=epochs, val_interval=1),
        val_cfg=dict(type="ValLoop"),
        test_cfg=dict(type="TestLoop"),
        optim_wrapper=optim_wrapper,
        param_scheduler=schedulers,
        default_hooks=dict(
            timer=dict(type="IterTimerHook"),
            logger=dict(type="LoggerHook", interval=log_interval),
            param_scheduler=dict(type="ParamSchedulerHook"),
            checkpoint=None,  # the engine keeps the best weights itself: no pickled mmengine checkpoints
            sampler_seed=dict(type="DistSamplerSeedHook"),
        ),
        env_cfg=dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
                     dist_cfg=dict(backend="nccl")),
        log_processor=dict(type="LogProcessor", window_size=50, by_epoch=True),
        log_level="INFO",
        load_from=None,
        resume=False,
        randomness=dict(seed=int(seed), deterministic=False),
        compile=bool(params.get("compile", False)),  # detection.compile: mmengine's Runner compiles the model's steps
    )
