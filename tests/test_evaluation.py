"""evaluate(): structure, agreement with direct attack calls and torchattacks, model state, per-attack seeds,
attack names with their steps, the AutoAttack backends."""

import json
import math
import sys
import types

import pytest
import torch
import torchattacks

import fastabsld
from fastabsld import attack
from fastabsld.evaluation import attack_seed, evaluate, parse_attack

CLASSES = 4
EPS, ALPHA = 0.1, 0.1 / 3  # large enough that every attack changes some predictions of the tiny model
KEYS = {"average", "worst", "nsd", "per_class", "count", "nonfinite"}


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 8), torch.nn.BatchNorm1d(8),
                               torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(8, CLASSES))


def tiny_data(size=24, batch=8, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(size, 3, 4, 4, generator=gen)
    y = torch.arange(size) % CLASSES
    return x, y, [(x[i:i + batch], y[i:i + batch]) for i in range(0, size, batch)]


def trained(model, x, y):
    """A few steps of SGD so that the clean accuracy is not trivial; returns the model in train mode."""
    optimiser = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(30):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimiser.step()
    optimiser.zero_grad(set_to_none=True)
    return model


MODEL_X, MODEL_Y, LOADER = tiny_data()
MODEL = trained(tiny_model(), MODEL_X, MODEL_Y)


def per_class(inputs, model=MODEL):
    with torch.no_grad():
        correct = model.eval()(inputs).argmax(1) == MODEL_Y
    return [correct[MODEL_Y == k].double().mean().item() for k in range(CLASSES)]


@pytest.fixture(scope="module")
def results():
    MODEL.train()
    state = {k: v.clone() for k, v in MODEL.state_dict().items()}
    out = evaluate(MODEL, LOADER, attacks=("clean", "fgsm", "pgd", "cw"), eps=EPS, alpha=ALPHA, steps=3,
                   progress=False, seed=5)
    assert MODEL.training and all(module.training for module in MODEL.modules())
    assert all(torch.equal(state[k], v) for k, v in MODEL.state_dict().items())  # BN statistics untouched
    assert all(p.grad is None for p in MODEL.parameters())
    return out


def test_structure_and_json(results):
    assert list(results) == ["clean", "fgsm", "pgd3", "cw3"]  # bare names are reported with the steps they ran
    for figures in results.values():
        assert set(figures) == KEYS and figures["count"] == len(MODEL_Y)
        assert len(figures["per_class"]) == CLASSES
        assert all(0 <= value <= 1 for value in figures["per_class"])
        assert figures["worst"] == min(figures["per_class"])
    json.dumps(results, allow_nan=False)  # nothing undefined here
    assert results["clean"]["average"] > 0.5
    for name in ("fgsm", "pgd3", "cw3"):
        assert results[name]["average"] < results["clean"]["average"], name


def test_clean_and_fgsm_against_direct_computation(results):
    assert results["clean"]["per_class"] == pytest.approx(per_class(MODEL_X))
    fgsm = torchattacks.FGSM(MODEL.eval(), eps=EPS)
    adversarial = torch.cat([fgsm(x, y) for x, y in LOADER])
    assert results["fgsm"]["per_class"] == pytest.approx(per_class(adversarial))


def test_pgd_and_cw_against_direct_attack_calls(results):
    MODEL.eval()
    # Each attack has its own generator, seeded from (seed, name), drawn batch after batch.
    pgd_gen = torch.Generator().manual_seed(attack_seed(5, "pgd3"))
    cw_gen = torch.Generator().manual_seed(attack_seed(5, "cw3"))
    pgd_inputs, cw_inputs = [], []
    for x, y in LOADER:
        pgd_inputs.append(attack.pgd(MODEL, x, attack.ce_loss(y), eps=EPS, alpha=ALPHA, steps=3, generator=pgd_gen))
        cw_inputs.append(attack.pgd(MODEL, x, attack.cw_loss(y, confidence=50), eps=EPS, alpha=ALPHA, steps=3,
                                    generator=cw_gen))
    assert results["pgd3"]["per_class"] == pytest.approx(per_class(torch.cat(pgd_inputs)))
    assert results["cw3"]["per_class"] == pytest.approx(per_class(torch.cat(cw_inputs)))


def test_autoattack_through_torchattacks():
    # A radius this large fools every sample in APGD-CE, so the later AutoAttack stages are skipped.
    x, y, loader = tiny_data(size=8, batch=4)
    out = evaluate(MODEL, loader, attacks=("clean", "autoattack"), eps=1.0, progress=False,
                   autoattack_backend="torchattacks")
    assert out["autoattack"]["average"] == 0.0 and out["autoattack"]["count"] == 8
    assert (out["autoattack"]["backend"], out["autoattack"]["version"]) == ("torchattacks", "standard")
    assert math.isnan(out["autoattack"]["nsd"])  # mean accuracy 0: undefined


def test_autoattack_missing_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchattacks", None)
    monkeypatch.setitem(sys.modules, "autoattack", None)

    def no_batches():
        raise AssertionError("the loader must not be touched")
        yield

    with pytest.raises(ImportError, match="pip install torchattacks"):
        evaluate(MODEL, no_batches(), attacks=("clean", "autoattack"), progress=False)


def test_mixed_module_modes_restored_and_extra_classes():
    model = tiny_model()
    model.train()
    model[2].eval()  # a frozen BatchNorm inside a training model
    out = evaluate(model, LOADER, attacks=["clean"], num_classes=CLASSES + 2, progress=False)
    assert model.training and not model[2].training and model[4].training
    assert all(math.isnan(value) for value in out["clean"]["per_class"][CLASSES:])
    assert out["clean"]["per_class"][:CLASSES] == pytest.approx(per_class(MODEL_X, model))


def test_progress_bar(capsys):
    evaluate(MODEL, LOADER, attacks=("clean",), progress=True)
    assert "evaluate" in capsys.readouterr().err
    evaluate(MODEL, LOADER, attacks=("clean",), progress=False)
    assert capsys.readouterr().err == ""


def test_exported_lazily_from_package():
    assert fastabsld.evaluate is evaluate
    assert "evaluate" in fastabsld.__all__


def test_argument_errors():
    with pytest.raises(ValueError, match="attacks"):
        evaluate(MODEL, LOADER, attacks=("clean", "deepfool"), progress=False)
    with pytest.raises(ValueError, match="attacks"):
        evaluate(MODEL, LOADER, attacks=(), progress=False)
    with pytest.raises(ValueError, match="repeat"):
        evaluate(MODEL, LOADER, attacks=("clean", "clean"), progress=False)
    with pytest.raises(ValueError, match="repeat"):
        evaluate(MODEL, LOADER, attacks=("pgd", "pgd20"), progress=False)  # the same attack under two names
    for bad in ({"eps": -1.0}, {"eps": float("nan")}, {"alpha": -0.5}, {"seed": -1}, {"steps": 0},
                {"autoattack_version": "fast"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            evaluate(MODEL, LOADER, attacks=("clean", "fgsm", "pgd"), progress=False, **bad)
    with pytest.raises(ValueError, match="no batches"):
        evaluate(MODEL, [], attacks=("clean",), progress=False)


@pytest.mark.parametrize("others", [("clean", "fgsm", "cw20"), ("fgsm", "cw5", "clean")])
def test_pgd20_does_not_depend_on_the_other_attacks(others):
    """PGD-20 alone is the reference; beside any other attacks, before or after them, it is the same figure."""
    alone = evaluate(MODEL, LOADER, attacks=("pgd20",), eps=EPS, alpha=ALPHA, progress=False, seed=3)["pgd20"]
    for attacks in (others + ("pgd20",), ("pgd20",) + others):
        together = evaluate(MODEL, LOADER, attacks=attacks, eps=EPS, alpha=ALPHA, progress=False, seed=3)
        assert together["pgd20"] == alone, attacks
    other_seed = evaluate(MODEL, LOADER, attacks=("pgd20",), eps=EPS, alpha=ALPHA, progress=False, seed=4)["pgd20"]
    assert other_seed["per_class"] != alone["per_class"]  # the seed matters: the comparison above can fail


def test_attack_names_carry_their_steps():
    assert parse_attack("pgd50") == ("pgd50", "pgd", 50)
    assert parse_attack("pgd") == ("pgd20", "pgd", 20)
    assert parse_attack("pgd", steps=5) == ("pgd5", "pgd", 5)
    assert parse_attack("cw") == ("cw20", "cw", 20)
    assert parse_attack("clean") == ("clean", "clean", None)
    with pytest.raises(ValueError, match="runs 20 steps, but steps=5"):
        parse_attack("pgd20", steps=5)  # never run 5 steps under the label pgd20
    for bad in ("pgd0", "fgsm2", "deepfool", "PGD20", ""):
        with pytest.raises(ValueError, match="attack"):
            parse_attack(bad)
    out = evaluate(MODEL, LOADER, attacks=("pgd",), eps=EPS, alpha=ALPHA, steps=2, progress=False)
    assert list(out) == ["pgd2"]
    # A name's own count: two steps run, whatever the default.
    assert evaluate(MODEL, LOADER, attacks=("pgd2",), eps=EPS, alpha=ALPHA, progress=False) == out


def test_a_dataset_is_batched():
    dataset = torch.utils.data.TensorDataset(MODEL_X, MODEL_Y)
    direct = evaluate(MODEL, LOADER, attacks=("clean", "pgd2"), eps=EPS, alpha=ALPHA, progress=False)
    assert evaluate(MODEL, dataset, attacks=("clean", "pgd2"), eps=EPS, alpha=ALPHA, progress=False,
                    batch_size=8) == direct


class _FakeOfficialAutoAttack:
    """Stands in for the official package's AutoAttack: records its arguments, returns the inputs unchanged."""

    calls = []

    def __init__(self, model, norm, eps, version, seed, verbose, device):
        self.apgd_targeted = types.SimpleNamespace(n_target_classes=9)
        self.fab = types.SimpleNamespace(n_target_classes=9)
        type(self).calls.append({"norm": norm, "eps": eps, "version": version, "verbose": verbose, "self": self})

    def run_standard_evaluation(self, x, y, bs):
        assert bs == len(x)
        return x.clone()


def test_official_autoattack_backend_when_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "autoattack", types.SimpleNamespace(AutoAttack=_FakeOfficialAutoAttack))
    _FakeOfficialAutoAttack.calls.clear()
    out = evaluate(MODEL, LOADER, attacks=("clean", "autoattack"), eps=EPS, progress=False, autoattack_version="plus")
    call = _FakeOfficialAutoAttack.calls[0]
    assert (call["norm"], call["eps"], call["version"], call["verbose"]) == ("Linf", EPS, "plus", False)
    # Fewer than 10 classes: the targeted attacks aim at the C - 1 others.
    assert call["self"].apgd_targeted.n_target_classes == CLASSES - 1 == call["self"].fab.n_target_classes
    assert out["autoattack"]["backend"] == "autoattack"
    assert out["autoattack"]["per_class"] == out["clean"]["per_class"]  # the fake returns the clean inputs
    forced = evaluate(MODEL, LOADER, attacks=("autoattack",), eps=1.0, progress=False,
                      autoattack_backend="torchattacks")
    assert forced["autoattack"]["backend"] == "torchattacks"
