"""Recall of the bucketed top-k against exact top-k (CPU backend), on heavy-tailed activations.

Usage: python bench/selection_recall.py   -> prints a Markdown table."""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from layer_factory import heavy_tailed, random_layer  # noqa: E402

from decdec.calibrate import calibrate_thresholds  # noqa: E402
from decdec.layer import make_declinear  # noqa: E402


def main():
    rng = np.random.default_rng(0)
    print("| d_in | activations | k_chunk | mean recall | min recall |")
    print("|---|---|---|---|---|")
    for d_in in (4096, 14336):
        _, qw, cs, _ = random_layer(rng, 32, d_in, 3, 128, calib_tokens=8)
        for name, df in (("Student-t df=3 + outliers", 3.0), ("Student-t df=5 + outliers", 5.0)):
            t = calibrate_thresholds(heavy_tailed(rng, (512, d_in), df=df))
            test = heavy_tailed(rng, (200, d_in), df=df)
            for k in (4, 8, 16, 32):
                b = make_declinear(qw, cs, t, k_chunk=k)
                e = make_declinear(qw, cs, t, k_chunk=k, selection="exact")
                r = [len(np.intersect1d(b.select(x), e.select(x))) / max(1, len(e.select(x))) for x in test]
                print(f"| {d_in} | {name} | {k} | {np.mean(r):.3f} | {np.min(r):.3f} |")


if __name__ == "__main__":
    main()
