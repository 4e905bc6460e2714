"""Prints the GPU performance model of every modelled op: ``python -m benchmarks.gpu_model``."""

import sys

from benchmarks.gpu_model import hardware, kd_kl_div

OPS = (kd_kl_div,)


def main(argv=None):
    """Prints the table of every op module in OPS.

    Args:
        argv: unused (no options yet).

    Returns:
        None.
    """
    del argv
    rows = [row for op in OPS for row in op.rows()]
    print(hardware.format_rows(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
