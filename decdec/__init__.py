"""decdec: 3/4-bit quantized LLM layers with dynamic error compensation (DecDEC).

The C extension ``decdec._C`` holds :class:`DecLinear` (CPU backend always, CUDA backend when built
with nvcc).  The NumPy modules drive the pipeline: quantize -> calibrate -> tune -> run -> evaluate.
Importing decdec never imports torch.
"""
import os as _os


def _missing_extension(err: ModuleNotFoundError) -> ImportError:
    """The ImportError raised when decdec._C is absent: a source checkout (no compiled extension in
    it) is named as such, with the two ways out."""
    here = _os.path.dirname(_os.path.abspath(__file__))
    root = _os.path.dirname(here)
    if _os.path.isfile(_os.path.join(root, "setup.py")) and _os.path.isdir(_os.path.join(root, "csrc")):
        return ImportError(
            f"decdec is imported from the source folder {here}, which has no compiled extension "
            f"(decdec._C): install with `python3 -m pip install -e .` (builds it in place), or run "
            f"from outside the checkout to use an installed decdec")
    return ImportError(f"decdec's compiled extension decdec._C is missing from {here}: the "
                       f"installation is incomplete; reinstall with `python3 -m pip install decdec`"
                       f" or from a checkout with `python3 -m pip install .`")


try:
    import importlib as _importlib
    _importlib.import_module(__name__ + "._C")
except ModuleNotFoundError as _e:
    if _e.name != __name__ + "._C":
        raise
    raise _missing_extension(_e) from _e

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
