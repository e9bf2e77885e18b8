"""decdec: 3/4-bit quantized LLM layers with dynamic error compensation (DecDEC).

The C extension ``decdec._C`` holds :class:`DecLinear` (CPU backend always, CUDA backend when built
with nvcc).  The NumPy modules drive the pipeline: quantize -> calibrate -> tune -> run -> evaluate.
Importing decdec never imports torch.
"""
from ._C import (  # noqa: F401
    CHUNK,
    FORMAT_VERSION,
    CudaError,
    DecdecError,
    DecLinear,
    built_with_cuda,
    cuda_available,
)

__version__ = "0.1.0"

try:  # the CUDA build also exports DeviceArray
    from ._C import DeviceArray  # noqa: F401
except ImportError:
    pass

__all__ = ["DecLinear", "DecdecError", "CudaError", "cuda_available", "built_with_cuda",
           "CHUNK", "FORMAT_VERSION", "__version__"]
