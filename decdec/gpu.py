"""Small helpers shared by the GPU measurement code (decdec.bench, decdec.tune).

Measurements run inside the extension (`_C._cuda_bench_run`, modes `_C.BENCH_*`); what is decided
here is how many layer calls one captured graph holds and which n_tb a GPU accepts.
"""
from __future__ import annotations

from . import formats


def graph_iters(copies: int) -> int:
    """Layer calls per captured graph for a benchmark whose weights rotate over `copies` copies:
    every copy once (so no call finds its weights in L2), at least 20 and at most 400 calls."""
    return max(20, min(int(copies), 400))


def sm_count(device: int = 0) -> int:
    """Multiprocessors of a GPU (`_C.cuda_sm_count`): the n_tb limits depend on it."""
    from . import _C
    return int(_C.cuda_sm_count(device))


def n_tb_choices(n_sm: int, wanted=(4, 8, 16, 32)) -> tuple[int, ...]:
    """The n_tb values of `wanted` a GPU of n_sm SMs accepts (formats.n_tb_max); its default
    (formats.n_tb_default) when none of them fits, as on a small MIG slice."""
    hi = formats.n_tb_max(n_sm)
    got = tuple(n for n in wanted if 1 <= n <= hi)
    return got or (formats.n_tb_default(n_sm),)
