"""The custom ops of fastabsld: the one boundary between Python and the kernels.

Each op lives in its own module (schema, fake and autograd registrations, public function);
this module gathers their public functions.
"""

from fastabsld.kd_kl_div_op import kd_kl_div_forward
from fastabsld.pgd_step_op import pgd_step

__all__ = ["kd_kl_div_forward", "pgd_step"]
