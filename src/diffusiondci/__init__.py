"""DiffusionDCI: diffusion-based generation and segmentation of Dynamic Cell Imaging slides."""

__version__ = "0.1.0"

#: Label convention used everywhere in the toolkit.
CLASS_NAMES = ("background", "benign", "malignant")
NUM_CLASSES = len(CLASS_NAMES)
