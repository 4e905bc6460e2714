"""A Triton driver that compiles for a real GPU and records launches instead of making them.

Without a GPU, Triton's launch path (argument binding, specialisation, the kernel cache, the
launcher) can still run as it would on one: this driver reports an sm_90 device, lets Triton
compile its kernels ahead of time for it (PTX and cubin, as on an H100), loads nothing, and
replaces the driver call that launches a kernel (``cuLaunchKernelEx``) by a recorder. What runs
before that call is the host cost of a launch; the recorder counts launches and keeps the last
ones' names and grids. Tensors may live on the CPU: nothing reads their data.

Use it as a context manager::

    with RecordingDriver() as recorder:
        ...  # code that launches Triton kernels on CPU tensors
    recorder.launches  # [(kernel name, grid), ...]
"""

import collections
import dataclasses

from triton.backends.compiler import GPUTarget
from triton.runtime import driver as triton_driver

# The GPU the compiles target: an H100 (sm_90), 228 KiB of shared memory a block at most.
TARGET = GPUTarget("cuda", 90, 32)
MAX_SHARED_MEMORY = 232448
MULTIPROCESSORS = 132
# Launches the recorder remembers (the most recent ones). Keeping every launch's arguments would
# keep every output tensor of a timed loop alive, and the allocations it times would then be
# fresh memory each call (page faults) rather than the reused blocks of a real run.
KEPT_LAUNCHES = 64


class _Utils:
    """The driver's module utilities: loading a binary gives dummy handles (nothing reaches a GPU)."""

    def load_binary(self, name, kernel, shared, device):
        # module, function, registers, spills, most threads a block
        return 1, name, 0, 0, 1024

    def unload_module(self, module):
        pass

    def get_device_properties(self, device):
        return {"max_shared_mem": MAX_SHARED_MEMORY, "multiprocessor_count": MULTIPROCESSORS}


@dataclasses.dataclass
class RecordingDriver:
    """The active Triton driver while entered: compiles for ``TARGET``, records launches.

    Attributes:
        launches: (kernel name, (grid x, y, z)) of the launches since ``clear``, the last
            KEPT_LAUNCHES of them.
        arguments: each of those launches' kernel arguments (constexprs included, as Triton
            passes them).
    """

    launches: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=KEPT_LAUNCHES))
    arguments: collections.deque = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=KEPT_LAUNCHES))

    def __post_init__(self):
        self.utils = _Utils()
        recorder = self

        class Launcher:
            """Stands for Triton's CUDA launcher: records the launch it would make."""

            def __init__(self, src, metadata):
                self.name = getattr(src, "name", "kernel")

            def __call__(self, grid_x, grid_y, grid_z, stream, function, packed_metadata, launch_metadata,
                         enter_hook, exit_hook, *args):
                recorder.launches.append((self.name, (grid_x, grid_y, grid_z)))
                recorder.arguments.append(args)

        self.launcher_cls = Launcher

    def clear(self):
        """Forgets the launches recorded so far."""
        self.launches.clear()
        self.arguments.clear()

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return TARGET

    def get_active_torch_device(self):
        import torch
        return torch.device("cpu")

    def __enter__(self):
        self._previous = triton_driver._active
        triton_driver.set_active(self)
        return self

    def __exit__(self, *exc):
        triton_driver._active = self._previous
