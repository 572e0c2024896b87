"""MONAI transforms shared by all bundles: each is an array class ``Foo`` and a dictionary class ``Food``."""

from .attributes import IGNORE_INDEX, EncodeAttributes, EncodeAttributesd, decode_attributes, encode_attributes
from .clicks import PAD_LABEL, ClickSimulator, SimulateClicksd, sample_click
from .crop import CropLargestLesion, CropLargestLesiond, largest_lesion_center, paste_back
from .intensity import WINDOWS, HUWindow, HUWindowd
from .slicing import SliceDataset, VolumeToSlices, VolumeToSlicesd, axial_axis, stack_slices
from .text import TokenizeText, TokenizeTextd, decode_tokens

from .findings import FindingsFromMask, FindingsFromMaskd, LungZonesFromText, LungZonesFromTextd
from .lung_mask import lung_mask_from_ct, split_left_right
from .lung_regions import LungZones, LungZonesd, lung_zone_map
