#!/usr/bin/env python3
"""Writes examples/data/digits.bin: scikit-learn's 8x8 handwritten digits with a fixed split.

What it writes
--------------
examples/data/digits.bin (beside this script): exactly 1797 records of 66 bytes each, no header,
in the original sample order of `sklearn.datasets.load_digits()`:

    bytes 0..63  pixel values 0..16, row-major 8x8 image
    byte  64     label 0..9
    byte  65     split: 0 = train, 1 = test

The split is `sklearn.model_selection.train_test_split(np.arange(1797), test_size=0.2,
random_state=0, stratify=labels)`: 1437 train / 360 test samples.

Generated with scikit-learn 1.9.1 and NumPy 2.4.6 (Python 3.11). load_digits() reads a data
file shipped inside the scikit-learn wheel, so nothing is downloaded.

How to rerun (from the repository root):

    python3 -m pip install scikit-learn numpy
    python3 examples/data/digits.py

The script checks the record count, the value ranges and the 360-sample test split, and then
prints a reference figure: the test accuracy of a plain backprop MLP baseline in NumPy.

Baseline (reference only; the Rust example computes its own figure)
-------------------------------------------------------------------
Network: inputs x/16, 64 -> 64 (tanh) -> 64 (tanh) -> 10 (linear), loss
0.5 * ||y - onehot||^2 averaged over the minibatch; Xavier-uniform weights
(U(-a, a), a = sqrt(6 / (fan_in + fan_out))) and zero biases from numpy default_rng(0), the same
generator then shuffling the training set each epoch; minibatch SGD, batch 32 (last batch
smaller), lr 0.05, 30 epochs, no momentum, no weight decay. Train on the 1437 training samples,
evaluate argmax accuracy on the 360 test samples.

As measured (scikit-learn 1.9.1, NumPy 2.4.6):
    test accuracy per epoch (of 360):
      1: 0.7694   2: 0.8750   3: 0.9000   4: 0.9194   5: 0.8722   6: 0.9083
      7: 0.9278   8: 0.9222   9: 0.9250  10: 0.9389  11: 0.9278  12: 0.9417
     13: 0.9361  14: 0.9278  15: 0.9417  16: 0.9417  17: 0.9417  18: 0.9389
     19: 0.9389  20: 0.9361  21: 0.9417  22: 0.9472  23: 0.9472  24: 0.9444
     25: 0.9639  26: 0.9500  27: 0.9583  28: 0.9611  29: 0.9444  30: 0.9639
    final (epoch 30): 0.9639 (347/360)
    digits.bin sha256: 40e480ad5a87039a2ee184c112acdf101e411af3f4bc5cd93144a94857894792
"""

import os
import sys

import numpy as np
import sklearn
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

N_SAMPLES = 1797
RECORD = 66
N_TEST = 360


def build_split():
    digits = load_digits()
    images = np.asarray(digits.data)  # (1797, 64) float, values 0..16
    labels = np.asarray(digits.target)  # (1797,) int 0..9
    assert images.shape == (N_SAMPLES, 64), images.shape
    assert labels.shape == (N_SAMPLES,), labels.shape
    pixels = images.astype(np.int64)
    assert np.array_equal(pixels, images), "pixel values are not integers"
    assert pixels.min() >= 0 and pixels.max() <= 16
    assert labels.min() == 0 and labels.max() == 9

    indices = np.arange(N_SAMPLES)
    _train_idx, test_idx = train_test_split(
        indices, test_size=0.2, random_state=0, stratify=labels
    )
    split = np.zeros(N_SAMPLES, dtype=np.uint8)
    split[test_idx] = 1
    assert int(split.sum()) == N_TEST, int(split.sum())
    return pixels.astype(np.uint8), labels.astype(np.uint8), split


def write_bin(path, pixels, labels, split):
    records = np.concatenate([pixels, labels[:, None], split[:, None]], axis=1).astype(np.uint8)
    assert records.shape == (N_SAMPLES, RECORD)
    data = records.tobytes(order="C")
    assert len(data) == N_SAMPLES * RECORD
    with open(path, "wb") as f:
        f.write(data)
    # Read back and check.
    with open(path, "rb") as f:
        back = np.frombuffer(f.read(), dtype=np.uint8)
    assert back.size == N_SAMPLES * RECORD
    back = back.reshape(N_SAMPLES, RECORD)
    assert np.array_equal(back, records)
    assert back[:, :64].max() <= 16 and back[:, 64].max() <= 9 and set(np.unique(back[:, 65])) <= {0, 1}
    assert int(back[:, 65].sum()) == N_TEST


def xavier_uniform(rng, fan_out, fan_in):
    a = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-a, a, size=(fan_out, fan_in))


def baseline(pixels, labels, split, epochs=30, batch=32, lr=0.05, seed=0):
    """Plain backprop MLP 64-64(tanh)-64(tanh)-10(linear), squared error vs one-hot."""
    x = pixels.astype(np.float64) / 16.0
    onehot = np.eye(10)[labels]
    tr = np.flatnonzero(split == 0)
    te = np.flatnonzero(split == 1)

    rng = np.random.default_rng(seed)
    sizes = [64, 64, 64, 10]
    W = [xavier_uniform(rng, sizes[i + 1], sizes[i]) for i in range(3)]
    b = [np.zeros(sizes[i + 1]) for i in range(3)]

    def forward(xb):
        h1 = np.tanh(xb @ W[0].T + b[0])
        h2 = np.tanh(h1 @ W[1].T + b[1])
        out = h2 @ W[2].T + b[2]
        return h1, h2, out

    def accuracy(idx):
        return float(np.mean(np.argmax(forward(x[idx])[2], axis=1) == labels[idx]))

    accs = []
    for epoch in range(epochs):
        perm = tr[rng.permutation(tr.size)]
        for start in range(0, perm.size, batch):
            idx = perm[start:start + batch]
            xb, yb = x[idx], onehot[idx]
            n = idx.size
            h1, h2, out = forward(xb)
            # loss = (1/n) sum_b 0.5 ||out_b - y_b||^2
            d3 = (out - yb) / n
            d2 = (d3 @ W[2]) * (1.0 - h2 * h2)
            d1 = (d2 @ W[1]) * (1.0 - h1 * h1)
            gW = [d1.T @ xb, d2.T @ h1, d3.T @ h2]
            gb = [d1.sum(0), d2.sum(0), d3.sum(0)]
            for i in range(3):
                W[i] -= lr * gW[i]
                b[i] -= lr * gb[i]
        acc = accuracy(te)
        accs.append(acc)
        print(f"epoch {epoch + 1:2d}: test accuracy {acc:.4f} ({round(acc * te.size)}/{te.size})")
    return accs


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    out = os.path.join(here, "digits.bin")
    pixels, labels, split = build_split()
    write_bin(out, pixels, labels, split)
    print(f"wrote {out}: {N_SAMPLES} records x {RECORD} bytes, "
          f"{int((split == 0).sum())} train / {int(split.sum())} test "
          f"(scikit-learn {sklearn.__version__}, NumPy {np.__version__}, Python {sys.version.split()[0]})")
    accs = baseline(pixels, labels, split)
    print(f"final test accuracy (backprop MLP baseline, 30 epochs): {accs[-1]:.4f}")


if __name__ == "__main__":
    main()
