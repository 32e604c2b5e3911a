"""Object detection and instance segmentation: config (torch-free), training task, COCO metrics, inference pipeline.

Importing this package imports no torch: ``config`` is read by ``cnnkit --help``; ``task``
(training) and ``pipeline`` (inference) are imported where they are used.
"""
