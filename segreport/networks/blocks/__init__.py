"""Building blocks shared by the segreport networks."""

from .encoders import ConvNeXtEncoder, adapt_stem_weight
from .text_decoder import (
    CachedMultiheadAttention,
    CachedTransformerDecoderLayer,
    DecoderCache,
    TransformerTextDecoder,
    sinusoidal_encoding,
    sinusoidal_encoding_2d,
)
from .unet_decoder import UNetDecoder
