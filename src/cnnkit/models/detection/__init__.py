"""Detection networks: torchvision's two-stage and one-stage detectors on registry backbones,
cnnkit's fast anchor-free detector, and anchor tools."""
