"""DiffusionDCI: diffusion-based generation and segmentation of Dynamic Cell Imaging slides."""

__version__ = "0.1.0"

#: Label convention used everywhere in the toolkit.
CLASS_NAMES = ("background", "benign", "malignant")
NUM_CLASSES = len(CLASS_NAMES)
#: Display colour (RGB) of each label everywhere: masks, overlays, reports and exported GeoJSON
#: (the paper's Fig. 5: background blue, benign green, malignant yellow).
LABEL_COLOURS = ((40, 70, 200), (40, 180, 60), (250, 220, 40))
