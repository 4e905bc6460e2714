"""The ``fastabsld`` command line."""

import argparse
import sys


def _demo(args):
    import torch

    import fastabsld
    from fastabsld.ops import pgd_step

    print(f"fastabsld {fastabsld.__version__}: extension={'yes' if fastabsld.HAS_EXTENSION else 'no'}, "
          f"CUDA kernels={'yes' if fastabsld.has_cuda_kernels() else 'no'}, triton={'yes' if fastabsld.HAS_TRITON else 'no'}")
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 8, 8, generator=gen)
    grad = torch.randn(x.shape, generator=gen)
    x_adv = x
    for _ in range(10):
        x_adv = pgd_step(x_adv, x, grad, alpha=2 / 255, eps=8 / 255)
    dist = (x_adv - x).abs().amax().item()
    print(f"10 PGD L-inf steps on a random batch: max |x_adv - x| = {dist:.5f} (eps = {8 / 255:.5f})")
    return 0


def build_parser():
    """Builds the argument parser of the command line.

    Returns:
        argparse.ArgumentParser: the parser with its sub-commands.
    """
    parser = argparse.ArgumentParser(prog="fastabsld", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the demonstration")
    demo.set_defaults(func=_demo)
    return parser


def main(argv=None):
    """Runs the command line.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        int: the exit status.
    """
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return args.func(args)
