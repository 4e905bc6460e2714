"""The custom ops of fastabsld: the one boundary between Python and the kernels.

Each op lives in its own module (schema, fake and autograd registrations, public function);
this module gathers their public functions.
"""

from fastabsld.pgd_step_op import pgd_step

__all__ = ["pgd_step"]
