"""cnnkit: convolutional networks for computer vision behind one command line and API.

Examples:
    >>> import cnnkit
    >>> result = cnnkit.train("classify", data="digits", epochs=5)
    >>> model = cnnkit.load(result.weights)
    >>> [p.label for p in model(["digit.png"])]
"""

__version__ = "0.1.0"

__all__ = ["__version__", "attack", "explain", "export", "load", "predict", "prune", "robustness", "train", "val"]


def __getattr__(name):  # lazy: `import cnnkit` stays cheap and has no side effects
    if name in ("train", "val", "predict", "load", "export", "explain", "attack", "robustness", "prune"):
        from cnnkit import api

        return getattr(api, name)
    raise AttributeError(f"module 'cnnkit' has no attribute {name!r}")
