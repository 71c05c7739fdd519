"""The choices every entry point offers (command line, Python API, Slicer panel), spelled once.

No imports: the Slicer panel reads these before torch, scipy or antspyx are installed.
"""

DEVICE_CHOICES = ("auto", "cpu", "cuda")
MASK_SIZES_MM = (32, 64)  # mask side at 1 mm, for masking models (Ano-swinMAE's two settings)
DEFAULT_MASK_SIZE_MM = 64  # what a masking model gets when no --mask-size is given
REFINE_METHODS = ("none", "atropos")
PROGRESS_MODES = ("bar", "json", "none")
MASK_MODES = ("sliding", "iterative")  # how masking models place their masks (Ano-swinMAE's; IterMask3D-style)
