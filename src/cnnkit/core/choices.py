"""Option vocabularies shared by the torch-free configs and command line and by the models
that implement them (kept here so that reading them imports no torch)."""

ATTENTION = ("se", "cbam", "eca")  # attention blocks (models/blocks.py)
POOLS = ("avg", "max", "avgmax", "lp", "gem", "spp")  # global pooling (models/blocks.py)
NMS_METHODS = ("hard", "soft")  # models/detection/nms.py
DETECTORS = ("fastdet", "fasterrcnn", "retinanet", "ssd", "ssdlite")  # models/detection/zoo.py
INSTANCE_MODELS = ("maskrcnn",)  # detectors that also predict a mask per object (cnnkit instance)
SEGMENTERS = ("unet", "fcn", "deeplabv3")  # models/segmentation.py
SEGMENTERS_3D = ("unet3d", "vnet", "unet2d")  # models/volumetric.py
CLASSIFIERS_3D = ("densenet3d", "densenet2d")
VOLUME_MODELS = SEGMENTERS_3D + CLASSIFIERS_3D
MULTILABEL_LOSSES = ("bce", "asl")  # tasks/multilabel/task.py
SEG_LOSSES = ("ce", "dice", "focal", "ce+dice")  # tasks/segment/task.py
MEDICAL_LOSSES = ("dice", "dice+ce")  # tasks/medical/task.py

# illumination normalization inside classifiers (cnnkit.data.illumination)
ILLUMINATION = ("none", "standardize", "grayworld", "equalize")
