"""Two-process training over nccl (one GPU each) equals itself across ranks; needs 2 GPUs."""

import pytest
import torch

from tests.recipe import dist_worker
from tests.recipe.test_distributed import TINY, _launch, _taus, digits_file  # noqa: F401  (fixture)

pytestmark = pytest.mark.cuda


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs for a 2-process nccl run")
def test_two_gpus_over_nccl_with_sync_batchnorm(tmp_path, digits_file):  # noqa: F811
    spec = {"config": dict(TINY, model="cnn-s", device="cuda", sync_bn=True), "run_dir": str(tmp_path / "run"),
            "data": digits_file}
    results = _launch(2, spec, tmp_path / "out")
    assert sorted(results) == [0, 1]
    assert torch.equal(_taus(results[0]["history"]), _taus(results[1]["history"]))
    for key, value in results[0]["model"].items():  # SyncBatchNorm: the running statistics agree too
        torch.testing.assert_close(results[1]["model"][key], value, rtol=0, atol=0)
    assert dist_worker.PLAIN_MODEL  # the worker module is the one the CPU tests use
