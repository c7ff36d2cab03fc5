"""Built-in decoders. Each is registered through the plugin hooks (`ojbkq_core.builtin`)."""
from .babai import Babai
from .base import DecodeResult, Decoder
from .beam import Beam
from .exact import Exact, Exhaustive
from .klein import Klein
from .rtn import RTN
from .successive import Successive

BUILTIN = (RTN, Babai, Klein, Successive, Beam, Exact, Exhaustive)

__all__ = ["Decoder", "DecodeResult", "BUILTIN", "RTN", "Babai", "Klein", "Successive", "Beam", "Exact", "Exhaustive"]
