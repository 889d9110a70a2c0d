"""How strongly a target memorizes its training set: the figures quoted in docs/demo-model.md.

    python scripts/demo_memorization.py [--model demo] [--train digits:100] [--n 400] [--seed 0]

Samples N images (DDIM, 50 steps), then reports the median RMS-L2 distance to the nearest training image
against the training set's own nearest-other-image distance, and the share of samples whose nearest /
second-nearest distance is below 1/3 (Gu et al.), with the number of distinct training images they copy.
"""
from __future__ import annotations

import argparse

import numpy as np

from side_extract.data import load_image_set, to_uint8
from side_extract.models.target import count_parameters, load_target
from side_extract.sampling import sample


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--train", default="digits:100")
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    d = load_target(a.model)
    train = load_image_set(a.train)
    gen = to_uint8(sample(d, a.n, seed=a.seed, steps=50, batch_size=100))
    G = gen.reshape(len(gen), -1).astype(np.float64) / 255
    T = train.images.reshape(len(train), -1).astype(np.float64) / 255
    D = np.sqrt(((G[:, None] - T[None]) ** 2).mean(-1))
    s = np.sort(D, 1)
    copies = s[:, 0] / s[:, 1] < 1 / 3
    TT = np.sqrt(((T[:, None] - T[None]) ** 2).mean(-1))
    np.fill_diagonal(TT, np.inf)
    print(f"model {a.model}: {count_parameters(d.unet):,} parameters")
    print(f"median nearest-training distance of samples: {np.median(s[:, 0]):.3f}")
    print(f"median nearest-other distance within the training set: {np.median(TT.min(1)):.3f}")
    print(f"copies (d1/d2 < 1/3): {copies.mean():.1%} of {a.n}, covering {len(set(D.argmin(1)[copies]))} "
          f"of {len(train)} training images")


if __name__ == "__main__":
    main()
