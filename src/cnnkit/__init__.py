"""cnnkit: convolutional networks for computer vision behind one command line and API."""

__version__ = "0.1.0"
