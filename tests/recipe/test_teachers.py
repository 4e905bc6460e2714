"""Teachers from elsewhere: the TRADES / RobustBench WideResNet layout, plain state_dicts, wrappers, RobustBench,
errors."""

import hashlib
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastabsld.recipe import checkpoint
from fastabsld.recipe.config import TrainConfig
from fastabsld.recipe.errors import CheckpointError
from fastabsld.recipe.models import WideResNet, build_model
from fastabsld.recipe.teachers import (
    TeacherError,
    convert_trades_wideresnet,
    is_trades_wideresnet,
    load_teacher,
    unwrap_state_dict,
    weights_digest,
)


class TradesBlock(nn.Module):
    """The TRADES pre-activation block, transcribed from its definition: BN1 -> ReLU first; when the width changes
    (equalInOut false) the activated input also feeds the 1x1 ``convShortcut``; else the raw input is added."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.relu2 = nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equal_in_out = cin == cout
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x):
        activated = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(activated))))
        return (x if self.equal_in_out else self.convShortcut(activated)) + out


class TradesStage(nn.Module):
    def __init__(self, n, cin, cout, stride):
        super().__init__()
        self.layer = nn.Sequential(*[TradesBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                                     for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class TradesWideResNet(nn.Module):
    """The TRADES / RobustBench WideResNet with its parameter names (``conv1``, ``block1..3.layer.N``, the unused
    ``sub_block1``, ``bn1``, ``fc``) and its head: ReLU(BN), 8x8 average pooling, linear."""

    def __init__(self, depth=34, width=10, num_classes=10):
        super().__init__()
        n, widths = (depth - 4) // 6, (16, 16 * width, 32 * width, 64 * width)
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.block1 = TradesStage(n, widths[0], widths[1], 1)
        self.sub_block1 = TradesStage(n, widths[0], widths[1], 1)
        self.block2 = TradesStage(n, widths[1], widths[2], 2)
        self.block3 = TradesStage(n, widths[2], widths[3], 2)
        self.bn1, self.relu = nn.BatchNorm2d(widths[3]), nn.ReLU(inplace=True)
        self.fc = nn.Linear(widths[3], num_classes)
        self.channels = widths[3]

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.avg_pool2d(self.relu(self.bn1(out)), 8)
        return self.fc(out.view(-1, self.channels))


def trades_model(depth, width, num_classes=10, seed=0):
    """A TRADES WRN with non-trivial BatchNorm affine parameters and running statistics, in eval mode."""
    torch.manual_seed(seed)
    model = TradesWideResNet(depth, width, num_classes)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def wrapped(state, how):
    if how in ("module", "both"):
        state = {f"module.{k}": v for k, v in state.items()}
    if how in ("state_dict", "both"):
        state = {"state_dict": state, "epoch": 76}
    return state


IMAGES = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_wrn_34_10_with_the_trades_key_names_gives_the_same_logits(tmp_path):
    """The paper's teacher: WRN-34-10 in the TRADES layout (DataParallel prefix, under 'state_dict'), from a file."""
    reference = trades_model(34, 10)
    state = reference.state_dict()
    assert "block1.layer.4.convShortcut.weight" not in state and "block1.layer.0.convShortcut.weight" in state
    assert state["block3.layer.4.conv2.weight"].shape == (640, 640, 3, 3) and "sub_block1.layer.0.bn1.weight" in state
    path = tmp_path / "model_cifar_wrn.pt"
    torch.save(wrapped(state, "both"), path)
    del state
    teacher, info = load_teacher(str(path), model_name="cnn-l", num_classes=10, in_channels=3, example=IMAGES[:1])
    assert isinstance(teacher, WideResNet) and not teacher.training
    assert (info["format"], info["architecture"], info["source"]) == ("trades-wideresnet", "wrn-34-10", "file")
    assert len(info["sha256"]) == 16
    with torch.no_grad():
        expected = reference(IMAGES)
        torch.testing.assert_close(teacher(IMAGES), expected, rtol=1e-4, atol=1e-4)
    # The bundled name builds the same architecture: its parameter count and names are those converted.
    assert sorted(teacher.state_dict()) == sorted(build_model("wrn-34-10", 10, 3).state_dict())


@pytest.mark.parametrize("how", ["plain", "module", "state_dict", "both"])
def test_conversion_of_a_small_trades_wrn_under_every_wrapping(how, tmp_path):
    reference = trades_model(16, 2, num_classes=7, seed=3)
    torch.save(wrapped(reference.state_dict(), how), tmp_path / "t.pt")
    teacher, info = load_teacher(str(tmp_path / "t.pt"), num_classes=7, in_channels=3, example=IMAGES)
    assert info["architecture"] == "wrn-16-2"
    with torch.no_grad():
        torch.testing.assert_close(teacher(IMAGES), reference(IMAGES), rtol=1e-5, atol=1e-5)
    converted, shape = convert_trades_wideresnet(reference.state_dict())
    assert shape == {"depth": 16, "width": 2, "num_classes": 7, "in_channels": 3}
    assert not any(k.startswith("sub_block1") for k in converted)


def test_converted_teacher_trains_the_same_as_the_trades_model():
    """Train-mode forwards (batch statistics) agree too, so the bundled block is the same function throughout."""
    reference = trades_model(16, 1, seed=5).train()
    converted, shape = convert_trades_wideresnet(reference.state_dict())
    ours = WideResNet(shape["num_classes"], 3, shape["depth"], shape["width"])
    ours.load_state_dict(converted)
    ours.train()
    torch.testing.assert_close(ours(IMAGES), reference(IMAGES), rtol=1e-5, atol=1e-5)


def test_plain_state_dict_needs_and_uses_its_architecture(tmp_path):
    torch.manual_seed(0)
    model = build_model("cnn-l", 10, 1).eval()
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, tmp_path / "plain.pt")
    example = torch.rand(2, 1, 8, 8)
    teacher, info = load_teacher(str(tmp_path / "plain.pt"), model_name="cnn-l", num_classes=10, in_channels=1,
                                 example=example)
    assert info["format"] == "state_dict"
    torch.testing.assert_close(teacher(example), model(example))
    with pytest.raises(TeacherError, match="do not fit the architecture") as error:
        load_teacher(str(tmp_path / "plain.pt"), model_name="cnn-s", num_classes=10, in_channels=1)
    assert "plain.pt" in str(error.value) and "shape mismatch" in str(error.value)
    with pytest.raises(TeacherError, match="--teacher-model"):
        load_teacher(str(tmp_path / "plain.pt"), model_name=None, num_classes=10, in_channels=1)
    with pytest.raises(TeacherError, match="head.weight"):  # a 10-class teacher for a 4-class data set
        load_teacher(str(tmp_path / "plain.pt"), model_name="cnn-l", num_classes=4, in_channels=1, example=example)
    torch.save(trades_model(16, 1).state_dict(), tmp_path / "trades.pt")  # builds from its own shapes: 10 classes
    with pytest.raises(TeacherError, match="returns .* 4 classes"):
        load_teacher(str(tmp_path / "trades.pt"), num_classes=4, in_channels=3, example=IMAGES)


def test_fastabsld_checkpoints_rebuild_their_own_architecture(tmp_path):
    torch.manual_seed(1)
    model = build_model("cnn-s", 10, 1).eval()
    checkpoint.atomic_save({"format": checkpoint.FORMAT, "config": TrainConfig(model="cnn-s").to_dict(), "epoch": 3,
                            "model": model.state_dict(), "num_classes": 10, "in_channels": 1}, str(tmp_path / "b.pt"))
    teacher, info = load_teacher(str(tmp_path / "b.pt"), model_name="cnn-l", num_classes=10, in_channels=1)
    assert (info["format"], info["architecture"]) == ("fastabsld", "cnn-s")
    x = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(teacher(x), model(x))


def _bad_files(tmp_path):
    torch.manual_seed(0)
    files = {"empty": b"", "text": b"a teacher, honestly\n", "random": bytes(range(256)) * 40}
    for name, content in files.items():
        (tmp_path / f"{name}.pt").write_bytes(content)
    torch.save(build_model("cnn-l", 10, 1), tmp_path / "module.pt")  # a pickled nn.Module
    torch.save({"state_dict": {"conv.weight": torch.zeros(3)}}, tmp_path / "wrong_keys.pt")
    torch.save({"state_dict": [1, 2]}, tmp_path / "no_tensors.pt")
    good = tmp_path / "good.pt"
    torch.save(build_model("cnn-l", 10, 1).state_dict(), good)
    (tmp_path / "truncated.pt").write_bytes(good.read_bytes()[:2000])
    return {"empty": "is empty", "text": "not a PyTorch weights file", "random": "not a PyTorch weights file",
            "module": "pickled object", "wrong_keys": "do not fit", "no_tensors": "holds no state_dict",
            "truncated": "not a PyTorch weights file"}


def test_unusable_files_are_one_clear_error(tmp_path):
    for name, match in _bad_files(tmp_path).items():
        path = str(tmp_path / f"{name}.pt")
        with pytest.raises(TeacherError, match=match) as error:
            load_teacher(path, model_name="cnn-l", num_classes=10, in_channels=1)
        assert path in str(error.value), name
        assert "\n" not in str(error.value), name
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_teacher(str(tmp_path / "missing.pt"), model_name="cnn-l", num_classes=10, in_channels=1)


def test_unwrap_state_dict():
    state = {"a.weight": torch.zeros(1)}
    assert unwrap_state_dict({"model": {"module.a.weight": state["a.weight"]}}) == state
    assert unwrap_state_dict({"epoch": 3}) is None and unwrap_state_dict([1]) is None
    assert not is_trades_wideresnet(build_model("wrn-34-10", 10, 3).state_dict())


def test_robustbench_loader_is_optional_and_converts(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "robustbench", None)
    monkeypatch.setitem(sys.modules, "robustbench.utils", None)
    with pytest.raises(ImportError, match="pip install"):
        load_teacher("robustbench:Zhang2019Theoretically", num_classes=10, in_channels=3, dataset="cifar10")
    # With the package (a stand-in that returns a TRADES-layout model, as RobustBench's loader does).
    reference = trades_model(16, 1, seed=2)
    calls = []

    def load_model(model_name, dataset, threat_model, model_dir):
        calls.append((model_name, dataset, threat_model, model_dir))
        return reference

    package = types.ModuleType("robustbench")
    package.utils = types.SimpleNamespace(load_model=load_model)
    monkeypatch.setitem(sys.modules, "robustbench", package)
    monkeypatch.setitem(sys.modules, "robustbench.utils", package.utils)
    teacher, info = load_teacher("robustbench:Zhang2019Theoretically", num_classes=10, in_channels=3,
                                 example=IMAGES, dataset="cifar10", cache_dir=str(tmp_path))
    assert calls == [("Zhang2019Theoretically", "cifar10", "Linf", str(tmp_path / "robustbench"))]
    assert (info["source"], info["name"], info["format"]) == ("robustbench", "Zhang2019Theoretically",
                                                              "trades-wideresnet")
    with torch.no_grad():
        torch.testing.assert_close(teacher(IMAGES), reference(IMAGES), rtol=1e-5, atol=1e-5)
    with pytest.raises(TeacherError, match="cifar10/cifar100"):
        load_teacher("robustbench:X", num_classes=10, in_channels=1, dataset="digits")


def test_a_module_teacher_is_frozen_and_checked():
    model = build_model("cnn-l", 10, 1).train()
    teacher, info = load_teacher(model, num_classes=10, in_channels=1, example=torch.rand(2, 1, 8, 8))
    assert teacher is model and not model.training and not any(p.requires_grad for p in model.parameters())
    assert info == {"source": "module", "format": "module", "architecture": "SmallCNN",
                    "weights_sha256": weights_digest(model)}
    with pytest.raises(TeacherError, match="fails on the data's images"):
        load_teacher(build_model("cnn-l", 10, 1), num_classes=10, in_channels=3, example=torch.rand(2, 3, 8, 8))


def _flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _tensor_offset(path, tensor):
    """Where ``tensor``'s bytes lie in a ``torch.save`` file (its storages are stored uncompressed)."""
    offset = path.read_bytes().find(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    assert offset > 0
    return offset


def test_a_checksummed_teacher_file_is_verified_and_a_flipped_byte_is_an_error(tmp_path):
    torch.manual_seed(1)
    model = build_model("cnn-s", 10, 1).eval()
    path = tmp_path / "best.pt"
    checkpoint.atomic_save({"format": checkpoint.FORMAT, "config": TrainConfig(model="cnn-s").to_dict(), "epoch": 3,
                            "model": model.state_dict(), "num_classes": 10, "in_channels": 1}, str(path))
    _, info = load_teacher(str(path), num_classes=10, in_channels=1)
    assert info["checksum_verified"] is True and info["weights_sha256"] == weights_digest(model)
    # One bit of a weight: torch.load reads the file without complaint, so only the trailer can tell.
    _flip_byte(path, _tensor_offset(path, model.state_dict()["head.weight"]) + 5)
    with pytest.raises(CheckpointError, match="SHA-256 does not match") as error:
        load_teacher(str(path), num_classes=10, in_channels=1)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_a_file_from_elsewhere_is_identified_by_its_sha256(tmp_path):
    torch.manual_seed(1)
    model = build_model("cnn-l", 10, 1)
    path = tmp_path / "plain.pt"
    torch.save(model.state_dict(), path)
    _, info = load_teacher(str(path), model_name="cnn-l", num_classes=10, in_channels=1)
    assert info["checksum_verified"] is False
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    assert info["weights_sha256"] == weights_digest(model)


def test_weights_digest_tells_weights_apart_and_ignores_where_they_came_from(tmp_path):
    torch.manual_seed(1)
    model = build_model("cnn-s", 10, 1)
    same = build_model("cnn-s", 10, 1)
    same.load_state_dict(model.state_dict())
    assert weights_digest(same) == weights_digest(model)
    with torch.no_grad():
        next(same.parameters()).view(-1)[0] += 1e-7 * max(1.0, abs(next(same.parameters()).view(-1)[0].item()))
    assert weights_digest(same) != weights_digest(model)
    assert weights_digest(model.double()) != weights_digest(model.float())  # dtypes count
    # The same weights from a TRADES-layout file and from the converted module: one digest.
    reference = trades_model(10, 1)
    torch.save(reference.state_dict(), tmp_path / "trades.pt")
    converted, _ = load_teacher(str(tmp_path / "trades.pt"), num_classes=10, in_channels=3)
    _, info = load_teacher(converted, num_classes=10, in_channels=3)
    assert info["weights_sha256"] == weights_digest(converted)


def test_a_runs_own_last_checkpoint_is_a_teacher(tmp_path):
    """A full checkpoint (optimiser, numpy and torch RNG states) is read for its weights, not refused as code."""
    torch.manual_seed(1)
    model = build_model("cnn-s", 10, 1).eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.rand(4, 1, 8, 8)).sum().backward()
    optimizer.step()
    checkpoint.atomic_save({"format": checkpoint.FORMAT, "config": TrainConfig(model="cnn-s").to_dict(), "epoch": 2,
                            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "rng": checkpoint.rng_state({"data": torch.Generator().manual_seed(3)}),
                            "history": [{"epoch": 1, "train_loss": float("nan")}], "num_classes": 10,
                            "in_channels": 1}, str(tmp_path / "last.pt"))
    teacher, info = load_teacher(str(tmp_path / "last.pt"), model_name="cnn-l", num_classes=10, in_channels=1)
    assert (info["format"], info["architecture"], info["checksum_verified"]) == ("fastabsld", "cnn-s", True)
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), model(x))
    # Still no code: a pickled module inside a checkpoint is refused.
    checkpoint.atomic_save({"config": TrainConfig(model="cnn-s").to_dict(), "model": model}, str(tmp_path / "m.pt"))
    with pytest.raises(TeacherError, match="pickled object"):
        load_teacher(str(tmp_path / "m.pt"), num_classes=10, in_channels=1)


@pytest.mark.parametrize("init, fragments", [
    ("import a_dependency_robustbench_lacks\n", ["fails to import", "ModuleNotFoundError",
                                                 "a_dependency_robustbench_lacks"]),
    ("raise AttributeError('module torch has no attribute xyz')\n", ["fails to import", "AttributeError",
                                                                     "has no attribute xyz"]),
])
def test_an_installed_robustbench_that_fails_to_import_says_what_failed(monkeypatch, tmp_path, init, fragments):
    package = tmp_path / "site" / "robustbench"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(init)
    (package / "utils.py").write_text("def load_model(**kwargs):\n    raise AssertionError\n")
    for name in ("robustbench", "robustbench.utils"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(ImportError) as error:
        load_teacher("robustbench:Zhang2019Theoretically", num_classes=10, in_channels=3, dataset="cifar10")
    message = str(error.value)
    assert "needs the robustbench package" not in message and "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
