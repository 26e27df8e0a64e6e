"""QGSegmentationLib: backend of the QGSegmentation 3D Slicer extension.

Quality-guided semi-supervised segmentation: a quality predictor g(image, mask) -> Dice trained on
masks of known quality, and semi-supervised segmenters guided by it.

Importing this package is cheap: torch and monai are imported only by the modules that train or
infer, so the Slicer module can import the pure-Python parts (events protocol, job folders, scene
I/O) without pulling in the deep-learning stack.
"""

__version__ = "0.1.0"
