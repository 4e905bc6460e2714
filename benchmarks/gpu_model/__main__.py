"""Prints the GPU performance model of every modelled op: ``python -m benchmarks.gpu_model``."""

import sys

from benchmarks.gpu_model import hardware, kd_kl_div, pgd_step

OPS = (kd_kl_div,)


def main(argv=None):
    """Prints the KD loss's table (the op modules in OPS) and the PGD step's.

    Args:
        argv: unused (no options yet).

    Returns:
        None.
    """
    del argv
    rows = [row for op in OPS for row in op.rows()]
    print("KD loss (fastabsld.kd_kl_div, Triton), forward + backward")
    print(hardware.format_rows(rows))
    print()
    print("PGD step (fastabsld.ops.pgd_step, CUDA), one step")
    print(pgd_step.format_table(pgd_step.rows()))
    print(pgd_step.footer())


if __name__ == "__main__":
    main(sys.argv[1:])
