"""Networks, one module per model family; shared blocks in ``segreport.networks.blocks``."""

from .medsegtext import MEDSEGTEXT_CONFIGS, MedSegText
from .tmc import TMC, TMC_CONFIGS, ImageOnlyUNet
from .lapft import LAPFT, LAPFT_CONFIGS
