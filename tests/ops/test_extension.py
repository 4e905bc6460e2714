"""The package, its extension and their fallbacks."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastabsld
from fastabsld.ops import pgd


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
    script = textwrap.dedent(
        """
        import sys, types, warnings, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "fastabsld._C":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import fastabsld, torch
            from fastabsld.ops import pgd_step
        assert not fastabsld.HAS_EXTENSION
        messages = [str(w.message) for w in caught if "fastabsld._C" in str(w.message)]
        assert len(messages) == 1, messages
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
