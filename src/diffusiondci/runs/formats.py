"""Names and format tags of the run records that one stage writes and another loads.

``train-dsdm`` writes ``dsdm.json``; ``sample``, ``probe`` and ``train-seg`` load it
(:mod:`diffusiondci.diffusion.dsdm_run`). The segmentation record (``segmenter.json``) is named in
:mod:`diffusiondci.segmentation.model`, next to the code that rebuilds the network from it.
"""

DSDM_META = "dsdm.json"
DSDM_FORMAT = "diffusiondci.dsdm"
DSDM_VERSION = 1
