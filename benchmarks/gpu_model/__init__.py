"""A performance model of fastabsld's GPU kernels that runs without a GPU.

    python -m benchmarks.gpu_model

For each op and benchmark shape it prints the launches a real call makes (grid, warps, block
sizes, pipeline stages), the registers and spills of the variant compiled ahead of time for
sm_90, the CTAs an H100 SM holds at once, the waves on its 132 SMs, the DRAM bytes per element
against the op's minimum, and the time those bytes and launches alone would take. It is
arithmetic on the compiled code and the launch plan, not a measurement.

Layout: ``hardware`` holds the GPU facts and the occupancy, wave and roofline arithmetic shared
by every op; one module per op (``kd_kl_div``, ...) exposes ``rows()``; ``__main__`` prints them.

The per-op interface: ``rows()`` returns a list of dicts, one per case, with the keys

* ``op`` (str) and ``case`` (str, e.g. "(8, 32000) fp32");
* ``launches``: a list of ``hardware.launch_row(...)`` dicts (kernel, grid, programs, num_warps,
  blocks, num_stages, registers, spills, shared, ctas_per_sm, limiter, waves);
* ``logit_bytes``: bytes of the case's largest input tensor (what the wave targets key on);
* ``bytes``, ``min_bytes``: DRAM bytes moved (forward + backward) and the op's minimum;
  ``element_bytes``, ``min_element_bytes``: the per-element parts of both, per element;
* ``kernel_launches``: launches of the op and its backward;
* ``notes``: a short string (what the counts assume).

``hardware.time_columns(row)`` adds the roofline times; ``hardware.format_rows`` prints a list.
"""
