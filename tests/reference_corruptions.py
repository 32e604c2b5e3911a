"""The ``imagecorruptions`` package (Michaelis et al., 2019: Hendrycks & Dietterich's
ImageNet-C code made size-agnostic) as the reference for cnnkit's corruption kernels.

Version 1.1.2 (the latest) was written against older libraries and no longer imports on
today's stack. Four names it uses were removed upstream; each is given back here with the
same behaviour before the package is imported, and none of its arithmetic is touched:

- ``pkg_resources.resource_filename`` (setuptools removed ``pkg_resources``): the file beside
  the module;
- ``scipy.ndimage.interpolation`` (a module alias SciPy dropped): ``scipy.ndimage``;
- ``numpy.float_`` (removed in NumPy 2): ``numpy.float64``;
- ``skimage.filters.gaussian(..., multichannel=True)`` (removed in scikit-image 0.19):
  ``channel_axis=-1``.

It is installed into the test environment by ``make install`` (``--no-deps``, with
opencv-python-headless and scikit-image), never as a dependency of cnnkit.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path


def load():
    """The ``imagecorruptions.corruptions`` module, or None where it is not installed."""
    spec = importlib.util.find_spec("imagecorruptions")
    if spec is None or spec.origin is None:
        return None
    import numpy as np
    import scipy.ndimage

    if "pkg_resources" not in sys.modules:
        try:
            import pkg_resources  # noqa: F401  (an old setuptools still has it)
        except ImportError:
            shim = types.ModuleType("pkg_resources")
            shim.resource_filename = lambda package, name: str(Path(sys.modules[package].__file__).parent / name)
            sys.modules["pkg_resources"] = shim
    sys.modules.setdefault("scipy.ndimage.interpolation", scipy.ndimage)
    if not hasattr(np, "float_"):
        np.float_ = np.float64
    import imagecorruptions.corruptions as ic

    gaussian = ic.gaussian

    def gaussian_compat(image, *args, multichannel=None, **kwargs):
        if multichannel:
            kwargs["channel_axis"] = -1
        return gaussian(image, *args, **kwargs)

    ic.gaussian = gaussian_compat
    return ic
