"""Lung segmentation downstream: Montgomery/Shenzhen mask layouts (:mod:`.data`), a segmenter on any
registered backbone (:mod:`.model`), training and Dice/IoU with bootstrap CIs (:mod:`.train`), and
the summary across inits (:mod:`.summary`)."""
