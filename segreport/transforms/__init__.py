"""MONAI transforms shared by all bundles: each is an array class ``Foo`` and a dictionary class ``Food``."""

from .attributes import IGNORE_INDEX, EncodeAttributes, EncodeAttributesd, decode_attributes, encode_attributes
from .clicks import PAD_LABEL, ClickSimulator, SimulateClicksd, sample_click
from .crop import CropLargestLesion, CropLargestLesiond, largest_lesion_center, paste_back
from .intensity import WINDOWS, HUWindow, HUWindowd
from .slicing import SliceDataset, VolumeToSlices, VolumeToSlicesd, axial_axis, stack_slices
from .text import TokenizeText, TokenizeTextd, decode_tokens

# Findings <-> mask and lung regions (findings.py, lung_regions.py) are owned by other engineers;
# re-export FindingsFromMask(d), LungZonesFromText(d), LungZones(d) here once those modules are committed.
