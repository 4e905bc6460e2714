"""The op layer: the one boundary between Python and the kernels.

One module per op, each read top to bottom (schema for the fallback, the fallback kernel, fake and
autograd registrations, the eager/compiled path, the public function): ``kd_loss`` (the fused KD
loss) and ``pgd`` (the fused PGD step); beside them the extension loader (``_extension``), the
Triton kernels' loader (``_kernels``) and the argument checks every public function shares
(``checks``).
"""

from fastabsld.ops.kd_loss import kd_kl_div, kd_kl_div_forward
from fastabsld.ops.pgd import pgd_step

__all__ = ["kd_kl_div", "kd_kl_div_forward", "pgd_step"]
