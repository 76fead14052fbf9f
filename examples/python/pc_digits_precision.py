#!/usr/bin/env python3
"""Predictive coding that learns its own precision, on scikit-learn's 8x8 handwritten digits.

Two experiments with ``fep_kernels.nn.PCNetwork`` (the settling runs in the fep-kernels library;
everything else is plain PyTorch):

1. Classification. A 64-64-64-10 predictive-coding network (tanh on the hidden layers, the top
   layer clamped to the one-hot label while learning) trained with Adam on the settled free
   energy, once with fixed precisions and once with learned ones (a scalar precision per hidden
   layer, a diagonal one per output unit, log-parameterised so they stay positive). Prints the
   test accuracy of both. Prediction: settle with the top layer free and take its argmax.

2. Precision recovery. The same inputs, but regression targets: a fixed random linear map of
   the pixels plus Gaussian noise whose standard deviation sigma_i differs per output unit
   (known). Linear predictive-coding networks with a learned diagonal output precision: the
   free energy's minimum over pi_i is at 1 / mean(eps_i^2) of the settled errors, which is the
   maximum-likelihood 1 / sigma_i^2 when the settled output error is the noise. Three networks:
   64-8 (no free layer), and 64-32-8 with a fixed hidden precision of 1 or 100, which shows how
   a free hidden layer absorbs part of the output error (and so inflates the learned output
   precision) unless it is stiff. Prints the learned precisions against the true inverse
   variances. A fixed precision cannot do this: it weighs every unit's error alike.

Data: scikit-learn's digits (1797 images, 8x8, values 0..16) with a fixed stratified split of
1437 training and 360 test samples, read from ``examples/data/digits.bin`` (1797 records of 66
bytes: 64 pixels, the label, the split: 0 train, 1 test), so neither scikit-learn nor a
download is needed.

Run (from the repository root, after ``cargo build --release --lib``)::

    PYTHONPATH=bindings/python python3 examples/python/pc_digits_precision.py
    PYTHONPATH=bindings/python python3 examples/python/pc_digits_precision.py --epochs 30

(or ``pip install ./bindings/python`` first and drop ``PYTHONPATH``). Runs on the CPU in well
under a minute; ``--device cuda`` uses a GPU with a CUDA build of the library.
"""

import argparse
import os
import sys
import time
from typing import List, Optional, Tuple

import numpy as np
import torch

import fep_kernels as fk
from fep_kernels.nn import PCNetwork

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "data", "digits.bin")
RECORD, PIXELS, CLASSES = 66, 64, 10


def load_digits(path: str = DATA) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                           torch.Tensor]:
    """(train_x [1437, 64], train_y [1437], test_x [360, 64], test_y [360]): pixels / 16."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size % RECORD:
        raise ValueError(f"{path}: {raw.size} bytes is not a whole number of {RECORD}-byte records")
    rec = raw.reshape(-1, RECORD)
    x = torch.from_numpy(rec[:, :PIXELS].astype(np.float32) / 16.0)
    y = torch.from_numpy(rec[:, PIXELS].astype(np.int64))
    test = torch.from_numpy(rec[:, PIXELS + 1] == 1)
    return x[~test], y[~test], x[test], y[test]


def stable_eta(net: PCNetwork, eta_max: float) -> None:
    """Keeps the settling step stable as precisions are learned: settling is gradient descent on
    the free energy, whose curvature grows with the precisions, and
    ``PCNetwork.max_stable_eta()`` is the library's bound on the step below which it cannot
    diverge near a settled state (for the current weights and precisions)."""
    net.eta = min(eta_max, net.max_stable_eta())


def train(net: PCNetwork, x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int, lr: float,
          lr_pi: float, seed: int, adapt_eta: bool = False) -> List[float]:
    """Adam on the settled free energy over shuffled minibatches, with learning rate ``lr`` for
    the weights and biases and ``lr_pi`` for the log-precisions (two parameter groups); returns
    the mean energy per epoch. With ``adapt_eta``, the settling step follows the precisions
    (see :func:`stable_eta`)."""
    log_pis = list(net.log_precisions.parameters())
    others = [p for n, p in net.named_parameters() if not n.startswith("log_precisions.")]
    groups = [{"params": others, "lr": lr}]
    if log_pis:
        groups.append({"params": log_pis, "lr": lr_pi})
    opt = torch.optim.Adam(groups)
    g = torch.Generator().manual_seed(seed)
    eta_max = net.eta
    history = []
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=g)
        total = 0.0
        for i in range(0, x.shape[0], batch):
            idx = perm[i:i + batch]
            if adapt_eta:
                stable_eta(net, eta_max)
            total += net.learn_step(x[idx], y[idx], opt).item() * idx.numel()
        history.append(total / x.shape[0])
    return history


def accuracy(net: PCNetwork, x: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return (net(x).argmax(1).cpu() == labels).float().mean().item()


def classification(args: argparse.Namespace, data, learned: bool) -> Tuple[float, PCNetwork,
                                                                           float]:
    train_x, train_y, test_x, test_y = data
    dev = args.device
    onehot = torch.eye(CLASSES)[train_y].to(dev)
    torch.manual_seed(args.seed)  # the same initial weights for both runs
    if learned:
        # precisions learned from the same starting values as the fixed run
        net = PCNetwork([PIXELS, 64, 64, CLASSES], activations=["identity", "tanh", "tanh"],
                        precision=["scalar", "scalar", "diagonal"], init_precision=[4.0, 4.0, 1.0],
                        eta=0.1, steps=args.steps, device=dev)
    else:
        net = PCNetwork([PIXELS, 64, 64, CLASSES], activations=["identity", "tanh", "tanh"],
                        precision=[4.0, 4.0, 1.0], eta=0.1, steps=args.steps, device=dev)
    t = time.perf_counter()
    train(net, train_x.to(dev), onehot, args.epochs, args.batch, args.lr, args.lr_pi, args.seed,
          adapt_eta=learned)
    return accuracy(net, test_x.to(dev), test_y), net, time.perf_counter() - t


def recovery(args: argparse.Namespace, data) -> None:
    train_x, _, _, _ = data
    dev = args.device
    sigma = torch.tensor([0.2, 0.3, 0.4, 0.5, 0.7, 1.0, 1.4, 2.0])
    n_out = sigma.numel()
    g = torch.Generator().manual_seed(args.seed + 1)
    # the teacher: a fixed random linear map of the (centred) pixels, which every student
    # (linear, with or without a free hidden layer of 32 units) can represent exactly, so what
    # is left of its error is the noise
    a = torch.randn(n_out, PIXELS, generator=g) / PIXELS ** 0.5
    x = train_x - train_x.mean(0)
    y = x @ a.T + sigma * torch.randn(x.shape[0], n_out, generator=g)
    print(f"\n2. precision recovery: {x.shape[0]} samples, targets = a fixed linear map of the "
          f"pixels + noise with a known sigma per output unit; linear networks with a learned "
          f"diagonal output precision, batch 64, 10 settling steps, {args.recovery_epochs} "
          f"epochs each")
    configs = [("64-8", [PIXELS, n_out], ["diagonal"]),
               ("hid 1", [PIXELS, 32, n_out], [1.0, "diagonal"]),
               ("hid 100", [PIXELS, 32, n_out], [100.0, "diagonal"])]
    learned, residual = {}, None
    for name, widths, precision in configs:
        torch.manual_seed(args.seed)
        net = PCNetwork(widths, activations="identity", precision=precision, eta=0.1, steps=10,
                        device=dev)
        t = time.perf_counter()
        train(net, x.to(dev), y.to(dev), args.recovery_epochs, 64, 1e-2,
              args.recovery_lr_pi, args.seed, adapt_eta=True)
        learned[name] = net.precisions()[-1].cpu()
        print(f"   {name:>7}: {'-'.join(map(str, widths))}, precisions {precision} "
              f"({time.perf_counter() - t:.1f} s)")
        if name == "64-8":
            with torch.no_grad():  # its squared error at the prediction
                residual = (y - net(x.to(dev)).cpu()).pow(2).mean(0)
    head = "".join(f" {'pi (' + n + ')':>13} {'ratio':>6}" for n, _, _ in configs)
    print(f"   {'unit':>4} {'sigma':>6} {'1/sigma^2':>10}{head} {'1/mean eps^2':>13}")
    for i in range(n_out):
        true = 1.0 / sigma[i].item() ** 2
        row = "".join(f" {learned[n][i].item():>13.2f} {learned[n][i].item() / true:>6.2f}"
                      for n, _, _ in configs)
        print(f"   {i:>4} {sigma[i].item():>6.2f} {true:>10.2f}{row} "
              f"{1.0 / residual[i].item():>13.2f}")
    print("""   ratio = learned / true; last column: 1 / the 64-8 network's mean squared error at its
   prediction. A learned pi_i goes to 1 / mean(eps_i^2) at the *settled* state with the output
   clamped. Without a free layer (64-8) that is the residual of the fit, and pi recovers
   1/sigma^2. With a free hidden layer, the hidden layer moves to absorb part of the output
   error, the more so the lower its precision and the higher the output's: the settled errors
   are smaller than the noise and pi overshoots (hid 1). A stiff hidden layer (hid 100) absorbs
   less, so pi comes closer to 1/sigma^2; but the settled free energy has no minimum in the
   output precision when the hidden layer can explain the output exactly (eps_L -> 0 and
   -1/2 ln pi_L -> -inf as pi_L -> inf), so with longer training (--recovery-epochs 30) pi
   drifts upwards. A fixed output precision stays where it was put.""")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=10, help="classification epochs (default 10)")
    p.add_argument("--recovery-epochs", type=int, default=10,
                   help="epochs of each precision-recovery run (default 10)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3,
                   help="Adam's learning rate for the weights and biases (classification)")
    p.add_argument("--lr-pi", type=float, default=1e-3,
                   help="Adam's learning rate for the log-precisions (classification)")
    p.add_argument("--recovery-lr-pi", type=float, default=2e-2,
                   help="Adam's learning rate for the log-precisions (precision recovery)")
    p.add_argument("--steps", type=int, default=20, help="settling steps per learning step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(1)  # small tensors: one thread is fastest (and fair on a shared machine)

    data = load_digits()
    print(f"fep-kernels {fk.version()}, torch {torch.__version__}, device {args.device}; "
          f"digits: {data[0].shape[0]} train / {data[2].shape[0]} test")

    print(f"\n1. classification: 64-64-64-10, tanh hidden layers, Adam lr {args.lr}, batch "
          f"{args.batch}, {args.epochs} epochs, {args.steps} settling steps")
    acc, _, secs = classification(args, data, learned=False)
    print(f"   fixed precision (4, 4, 1):        test accuracy {acc:.4f}  ({secs:.1f} s)")
    acc_l, net, secs = classification(args, data, learned=True)
    pis = net.precisions()
    print(f"   learned precision (from 4, 4, 1): test accuracy {acc_l:.4f}  ({secs:.1f} s)")
    print(f"   learned: pi_1 = {pis[0].item():.3g}, pi_2 = {pis[1].item():.3g}, output pi "
          f"per class = {[round(v, 3) for v in pis[2].tolist()]}")
    print("   (a learned precision tracks 1 / mean(eps^2) of the settled errors, which keeps "
          "falling as the\n   fit to the one-hot targets improves: the precisions keep "
          "growing, and the settling step\n   shrinks with them; hence the small --lr-pi)")
    recovery(args, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
