"""Single-label image classification: config (torch-free), training task, inference pipeline.

Importing this package imports no torch: ``config`` is read by ``cnnkit --help``; ``task``
(training) and ``pipeline`` (inference) are imported where they are used.
"""
