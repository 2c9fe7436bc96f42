"""Callbacks of em_lightning, one job per file; installed as ``em_lightning.callbacks`` (see ``pyproject.toml``).

The folder sits at the repository's top level, but its import name is ``em_lightning.callbacks``. Imported as a
bare ``callbacks`` (the repository root on ``sys.path``, e.g. an old ``config.yaml`` naming
``callbacks.spectrum_logger.SpectrumLogger``), it refuses: a second copy of the same classes under another name
would make ``isinstance`` checks across the two fail in confusing ways.
"""

if __name__ == "callbacks":
    raise ImportError(
        "the callbacks/ folder is the package em_lightning.callbacks: write class paths as "
        "em_lightning.callbacks.<file>.<Class> (e.g. em_lightning.callbacks.spectrum_logger.SpectrumLogger) "
        "instead of callbacks.<file>.<Class>"
    )
