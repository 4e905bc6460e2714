"""The package, its extension and their fallbacks."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import fastabsld
from fastabsld.ops import pgd
from tests.ops.without_extension import BLOCK_EXTENSION


def test_extension_is_built_and_registers_its_ops():
    assert fastabsld.HAS_EXTENSION, f"fastabsld._C failed to load: {fastabsld.ops._extension.EXTENSION_ERROR}"
    assert hasattr(torch.ops.fastabsld, "pgd_step")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fastabsld::pgd_step", "CPU")


def test_python_schema_matches_the_compiled_one():
    schema = str(torch.ops.fastabsld.pgd_step.default._schema)
    assert schema == "fastabsld::" + pgd.SCHEMA


@pytest.mark.skipif(os.environ.get("FASTABSLD_CUDA", "auto") == "0", reason="CUDA build disabled")
def test_cuda_kernels_are_compiled_in_when_torch_is_a_cuda_build():
    if torch.version.cuda is None:
        pytest.skip("torch is a CPU build")
    assert fastabsld.has_cuda_kernels()


def test_package_imports_without_the_extension_and_warns(tmp_path):
    """Copies the package without its .so and checks the fallback in a fresh interpreter."""
    script = BLOCK_EXTENSION + textwrap.dedent(
        """
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import fastabsld, torch
            from fastabsld.ops import pgd_step
        assert not fastabsld.HAS_EXTENSION
        messages = [str(w.message) for w in caught if "fastabsld._C" in str(w.message)]
        assert len(messages) == 1, messages
        assert "blocked for the test" in messages[0] and "circular" not in messages[0], messages
        x = torch.rand(2, 5)
        out = pgd_step(x, x, torch.ones_like(x), alpha=0.1, eps=0.05)
        assert torch.allclose(out, (x + 0.05).clamp(0, 1))
        print("fallback ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "fallback ok" in result.stdout


def test_kernels_subpackage_is_installed_from_the_kernels_folder():
    import fastabsld.kernels

    assert os.path.basename(os.path.dirname(fastabsld.kernels.__file__)) == "kernels"


def test_source_checkout_imports_without_installing(tmp_path):
    """A copy of the sources, not installed and without the built .so, imports with its kernels.

    ``python -S`` skips the site hooks, so the editable install's finder is not there: only the
    copy and the third-party packages are on the path.
    """
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ignore = shutil.ignore_patterns("*.so", "__pycache__")
    shutil.copytree(os.path.join(root, "fastabsld"), tmp_path / "fastabsld", ignore=ignore)
    shutil.copytree(os.path.join(root, "kernels"), tmp_path / "kernels", ignore=ignore)
    site_packages = os.path.dirname(os.path.dirname(torch.__file__))
    script = textwrap.dedent(
        """
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import fastabsld, fastabsld.loss, fastabsld.kernels
        import torch
        assert fastabsld.__file__.startswith(CHECKOUT), fastabsld.__file__
        assert fastabsld.kernels.__file__.startswith(CHECKOUT), fastabsld.kernels.__file__
        assert not fastabsld.HAS_EXTENSION
        reasons = [str(w.message) for w in caught if "fastabsld._C" in str(w.message)]
        assert len(reasons) == 1 and "it was not built" in reasons[0], reasons
        loss = fastabsld.loss.kd_kl_div(torch.zeros(2, 3), torch.zeros(2, 3))
        assert loss.item() == 0.0
        print("checkout ok")
        """
    ).replace("CHECKOUT", repr(str(tmp_path)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), site_packages]))
    result = subprocess.run([sys.executable, "-S", "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert "checkout ok" in result.stdout


def _cpu_isas():
    """The vector ISAs of the CPU pgd_step loops this machine can run, widest first, then "scalar"."""
    capability = torch.backends.cpu.get_cpu_capability()
    return {"AVX512": ["avx512", "avx2", "scalar"], "AVX2": ["avx2", "scalar"]}.get(capability, ["scalar"])


@pytest.mark.skipif(not fastabsld.HAS_EXTENSION, reason="the vector loops are in fastabsld._C")
def test_the_cpu_loops_follow_the_cpu_and_aten():
    from fastabsld import _C

    assert _C.pgd_step_cpu_isa() == _cpu_isas()[0]


@pytest.mark.skipif(not fastabsld.HAS_EXTENSION, reason="the vector loops are in fastabsld._C")
@pytest.mark.parametrize("isa", _cpu_isas()[1:])
def test_every_narrower_cpu_isa_passes_the_pgd_tests(isa):
    """The PGD tests again in a fresh process whose ATEN_CPU_CAPABILITY selects narrower fp32 loops
    (this process runs the widest), so every loop set this machine can run is tested."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY={"avx2": "avx2", "scalar": "default"}[isa])
    check = subprocess.run([sys.executable, "-c", "import fastabsld._C as C; print(C.pgd_step_cpu_isa())"],
                           capture_output=True, text=True, timeout=300, env=env)
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip() == isa
    tests = os.path.dirname(__file__)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         os.path.join(tests, "test_pgd.py"), os.path.join(tests, "test_pgd_numerics.py")],
        capture_output=True, text=True, timeout=900, env=env,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout.splitlines()[-1]


def test_the_fallback_kd_op_refuses_a_forward_mode_tangent():
    """Without the extension the KD op's kernel refuses a tangent as the C++ one does (never a None tangent)."""
    script = BLOCK_EXTENSION + textwrap.dedent(
        """
        import warnings
        warnings.simplefilter("ignore")
        import torch, fastabsld
        from torch.autograd import forward_ad
        assert not fastabsld.HAS_EXTENSION
        s, t = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
        with forward_ad.dual_level():
            dual = forward_ad.make_dual(s, torch.ones_like(s))
            try:
                torch.ops.fastabsld.kd_kl_div_forward(dual, t, None, None, None, 1.0, 1.0, -100, True, False)
                raise SystemExit("the raw op took a tangent")
            except NotImplementedError as error:
                assert "no forward-mode derivative" in str(error), error
            from fastabsld.loss import kd_kl_div
            assert forward_ad.unpack_dual(kd_kl_div(dual, t)).tangent is not None
        print("refused")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "refused" in result.stdout
