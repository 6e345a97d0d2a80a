"""Time the pixel metrics on 200 maps of 256 x 256 (a typical MVTec category's test set).

    python benchmarks/metrics_speed.py
"""

import time

import numpy as np

from prn import metrics


def main() -> None:
    rng = np.random.default_rng(11)
    masks = np.zeros((200, 256, 256), bool)
    masks[::2, 100:140, 60:90] = True
    maps = rng.random(masks.shape, dtype=np.float32) * 0.6 + masks * 0.3
    labels = masks.reshape(200, -1).any(1).astype(int)
    scores = maps.reshape(200, -1).max(1)
    for name, fn in [("pro_score", lambda: metrics.pro_score(masks, maps)),
                     ("compute_all", lambda: metrics.compute_all(labels, scores, masks, maps))]:
        start = time.perf_counter()
        fn()
        print(f"{name:12s} {time.perf_counter() - start:6.2f} s for 200 maps of 256x256")


if __name__ == "__main__":
    main()
