"""Dense prediction on a Pale backbone: UperNet semantic segmentation (segmentation-models-pytorch)
and Mask R-CNN detection / instance segmentation (torchvision), trained with :mod:`pale.train`'s engine.

* :mod:`pale.dense.upernet` -- :class:`PaleUperNet` (any input size, auxiliary FCN head)
* :mod:`pale.dense.seg_data`, :mod:`pale.dense.seg_eval`, :mod:`pale.dense.seg_task` -- ADE20K-layout
  data, mmseg-style augmentation, whole / sliding-window / multi-scale + flip inference, mIoU / mAcc / aAcc
* :mod:`pale.dense.maskrcnn`, :mod:`pale.dense.det_data`, :mod:`pale.dense.det_task` -- Mask R-CNN with an
  FPN over Pale's four maps, COCO-format data, COCOeval box / mask AP
* :mod:`pale.dense.cost` -- full-model parameters and multiply-adds against the paper's
* :mod:`pale.dense.overlay` -- PNG overlays of masks and boxes
* :mod:`pale.dense.toydata` -- small datasets made from scikit-image's photos with known labels
"""
