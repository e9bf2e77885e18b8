"""The tuner against a synthetic cost model with a known answer, and on the GPU when present."""
import numpy as np
import pytest

import decdec
from decdec import tune as T
from layer_factory import random_layer


def synthetic(knee_by_ntb):
    """Base time = bytes of a 3-bit weight at 2.5 TB/s; DEC is free up to a knee that grows with
    n_tb, then costs linearly (the shape the paper and our bench measure)."""
    def measure(m, bits, n_tb, k):
        base = m.d_in * m.d_out * bits / 8 / 2.5e6
        knee = knee_by_ntb[n_tb]
        return base * (1 + 0.002 * k + max(0, k - knee) * 0.01 * (m.d_in / 4096))
    return measure


MODULES = T.llama_modules(**T.PRESETS["llama3-8b"])


@pytest.mark.parametrize("target", [0.025, 0.05, 0.10])
def test_tune_stays_within_target_and_is_maximal(target):
    measure = synthetic({4: 4, 8: 10, 16: 14, 32: 12})
    r = T.tune(MODULES, 3, target, measure)
    assert r.n_tb == 16  # the n_tb with the largest knee allows the largest uniform k
    assert r.tuned_us <= r.base_us * (1 + target) + 1e-9
    assert r.slowdown <= target
    # maximal: no single +1 fits the budget any more
    for g in r.k_chunk:
        ks = dict(r.k_chunk, **{g: r.k_chunk[g] + 1})
        t = sum(m.count * measure(m, 3, r.n_tb, ks[m.name]) for m in MODULES)
        assert t > r.base_us * (1 + target)
    # a larger target never buys less compensation
    r2 = T.tune(MODULES, 3, target * 2, measure)
    assert sum(r2.k_chunk.values()) >= sum(r.k_chunk.values())


def test_tune_prefers_cheap_modules_in_phase_2():
    measure = synthetic({4: 8, 8: 8, 16: 8, 32: 8})
    r = T.tune(MODULES, 3, 0.05, measure)
    # down (d_in 14336) pays 3.5x more per channel past the knee than the 4096-wide inputs
    assert r.k_chunk["down"] <= min(r.k_chunk["qkv"], r.k_chunk["o"], r.k_chunk["gate_up"])


def test_tune_rejects_bad_arguments():
    with pytest.raises(ValueError):
        T.tune([], 3, 0.05, lambda *a: 1.0)
    with pytest.raises(ValueError):
        T.tune(MODULES, 3, 0.0, lambda *a: 1.0)


def test_apply_sets_k_chunk_and_n_tb_on_declinear():
    rng = np.random.default_rng(3)
    _, qw, cs, t = random_layer(rng, 64, 256, 3, 128)
    from decdec.layer import make_declinear
    linears = {(0, "wq"): make_declinear(qw, cs, t), (0, "w_down"): make_declinear(qw, cs, t),
               (0, "lm_head"): make_declinear(qw, cs, t)}
    r = T.TuneResult(8, {"qkv": 12, "o": 10, "gate_up": 9, "down": 5}, 1.0, 1.02, 0.025, 0)
    assert T.apply(r, linears) == 2
    assert linears[(0, "wq")].k_chunk == 12 and linears[(0, "wq")].n_tb == 8
    assert linears[(0, "w_down")].k_chunk == 5
    assert linears[(0, "lm_head")].k_chunk == 0 and linears[(0, "lm_head")].n_tb == 16


def _cpu_layers():
    rng = np.random.default_rng(4)
    _, qw, cs, t = random_layer(rng, 64, 256, 3, 128)
    from decdec.layer import make_declinear
    return {(0, "wq"): make_declinear(qw, cs, t), (0, "w_down"): make_declinear(qw, cs, t)}


@pytest.mark.parametrize("n_tb", [0, -3, 1025])
def test_apply_refuses_an_n_tb_the_binding_refuses_and_changes_nothing(n_tb):
    linears = _cpu_layers()
    r = T.TuneResult(n_tb, {"qkv": 12, "down": 5}, 1.0, 1.0, 0.05, 0)
    with pytest.raises(ValueError, match=r"n_tb must be in \[1, 1024\]"):
        T.apply(r, linears)
    assert [(lin.k_chunk, lin.n_tb) for lin in linears.values()] == [(0, 16), (0, 16)]
    for lin in linears.values():  # the C setter draws the same line
        with pytest.raises(ValueError):
            lin.n_tb = n_tb


def test_apply_limits_cuda_layers_by_their_sm_count():
    class FakeCudaLayer:  # only what apply looks at
        backend = "cuda"
        k_chunk, n_tb = 0, 2

    layers = {(0, "wq"): FakeCudaLayer(), (0, "wo"): FakeCudaLayer()}
    # a 16-SM MIG slice: n_tb_max = 15
    with pytest.raises(ValueError, match=r"n_tb must be in \[1, 15\] for a GPU of 16 SMs"):
        T.apply(T.TuneResult(16, {"qkv": 8, "o": 8}, 1.0, 1.0, 0.05, 0), layers, n_sm=16)
    assert all(lin.k_chunk == 0 and lin.n_tb == 2 for lin in layers.values())
    assert T.apply(T.TuneResult(15, {"qkv": 8, "o": 4}, 1.0, 1.0, 0.05, 0), layers, n_sm=16) == 2
    assert (layers[(0, "wq")].k_chunk, layers[(0, "wq")].n_tb) == (8, 15)
    assert (layers[(0, "wo")].k_chunk, layers[(0, "wo")].n_tb) == (4, 15)


def test_apply_refuses_a_k_chunk_out_of_range():
    linears = _cpu_layers()
    with pytest.raises(ValueError, match="k_chunk 1025"):
        T.apply(T.TuneResult(8, {"qkv": 1025, "down": 5}, 1.0, 1.0, 0.05, 0), linears)
    assert all(lin.k_chunk == 0 for lin in linears.values())


def test_tune_rejects_bad_n_tbs():
    with pytest.raises(ValueError, match="n_tbs is empty"):
        T.tune(MODULES, 3, 0.05, lambda *a: 1.0, n_tbs=())
    with pytest.raises(ValueError, match="n_tb must be in"):
        T.tune(MODULES, 3, 0.05, lambda *a: 1.0, n_tbs=(0, 8))


def test_n_tb_choices_fit_the_gpu():
    from decdec.gpu import graph_iters, n_tb_choices
    assert n_tb_choices(132) == (4, 8, 16, 32)
    assert n_tb_choices(16) == (4, 8)          # n_tb_max 15
    assert n_tb_choices(4) == (1,)             # none of 4..32 fits: the default, 4 // 8 -> 1
    assert n_tb_choices(33) == (4, 8, 16, 32)  # 32 = n_tb_max(33)
    assert [graph_iters(c) for c in (1, 20, 77, 400, 5000)] == [20, 20, 77, 400, 400]


def test_gpu_measure_passes_the_extensions_modes(monkeypatch):
    """GpuMeasure names the benchmark modes by _C's constants, not by position."""
    calls = []
    fake = {"built_with_cuda": lambda: True, "cuda_available": lambda: True,
            "BENCH_BASE": 1000, "BENCH_FUSED": 1002,
            "_cuda_bench_create": lambda d_in, d_out, bits, gs: ("bench", d_in, d_out, bits, gs),
            "_cuda_bench_info": lambda b: (123, 77, 132),
            "_cuda_bench_run": lambda b, mode, k, n_tb, iters, reps: calls.append(
                (b, mode, k, n_tb, iters, reps)) or 10.0 + k}
    for name, value in fake.items():
        monkeypatch.setattr(decdec._C, name, value, raising=False)
    m = T.GpuMeasure(reps=3)
    mod = T.Module("o", 256, 512)
    assert m(mod, 3, 8, 0) == 10.0 and m(mod, 3, 8, 4) == 14.0
    assert calls == [(("bench", 256, 512, 3, 128), 1000, 0, 8, 77, 3),
                     (("bench", 256, 512, 3, 128), 1002, 4, 8, 77, 3)]


@pytest.mark.gpu
@pytest.mark.skipif(not (decdec.built_with_cuda() and decdec.cuda_available()), reason="needs a GPU")
def test_tune_on_the_gpu():
    r = T.tune([T.Module("gate_up", 4096, 14336), T.Module("down", 14336, 4096)], 3, 0.05,
               T.GpuMeasure(reps=5), n_tbs=(8, 16), k_step=4, k_max=32)
    assert r.slowdown <= 0.05 and r.n_tb in (8, 16)
