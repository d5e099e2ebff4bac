"""_taxonomy is the one home of the module families: no other module defines activation or
normalization name lists or the saturation band, and every consumer agrees with the table."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from gradsentry import _taxonomy, stats, theory
from gradsentry.check import report as check_report
from gradsentry.diagnosis import advice, layer_rules
from gradsentry.diagnosis.thresholds import Thresholds
from gradsentry.remedies import init

SRC = Path(__file__).resolve().parents[2] / "src" / "gradsentry"
KINDS = set(_taxonomy.ACTIVATION_TABLE) | set(_taxonomy.NORMALIZATION_TABLE)

# Collections of two or more family names outside _taxonomy, each with why it stays:
ALLOWED = {
    # activation_stats' per-kind kernel branches (stats.py functions are another branch's to edit); the
    # behaviour is checked against the table in test_stats_kernels_follow_the_table
    ("stats.py", ("Softsign", "Tanh")),
    # the lab's model builder: a config word -> the class to build, not a family
    ("lab/models.py", ("ReLU", "Sigmoid", "Tanh")),
}


def _family_names(node: ast.AST) -> tuple[str, ...]:
    """The family names (string constants or ``nn.X`` attributes) listed in a tuple/list/set/dict literal."""
    if isinstance(node, ast.Dict):
        elts = [*(k for k in node.keys if k is not None), *node.values]
    elif isinstance(node, ast.Tuple | ast.List | ast.Set):
        elts = list(node.elts)
    else:
        return ()
    names = []
    for e in elts:
        if isinstance(e, ast.Constant) and isinstance(e.value, str) and e.value in KINDS:
            names.append(e.value)
        elif isinstance(e, ast.Attribute) and e.attr in KINDS:
            names.append(e.attr)
    return tuple(sorted(set(names)))


def _modules() -> list[tuple[str, ast.Module]]:
    out = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel != "_taxonomy.py":
            out.append((rel, ast.parse(path.read_text(encoding="utf-8"))))
    return out


def test_no_other_module_lists_activations_or_normalizations() -> None:
    found = set()
    for rel, tree in _modules():
        for node in ast.walk(tree):
            names = _family_names(node)
            if len(names) >= 2:
                found.add((rel, names))
    assert found <= ALLOWED, sorted(found - ALLOWED)


def _numeric(value: ast.expr) -> bool:
    """A number or an arithmetic formula (a call, an operation), not a name, string or tuple of names."""
    if isinstance(value, ast.Constant):
        return isinstance(value.value, int | float) and not isinstance(value.value, bool)
    return isinstance(value, ast.Call | ast.BinOp | ast.UnaryOp)


def test_no_other_module_defines_the_saturation_band() -> None:
    """A name about a band or saturation bound to a number (or a formula) is defined only in _taxonomy;
    elsewhere it is an import or a reference."""
    bad = []
    for rel, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = [t.id for t in targets if isinstance(t, ast.Name)]
                if any(("BAND" in n or "SATURATION" in n) for n in names) and _numeric(node.value):
                    bad.append((rel, names))
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "log":
                args = node.args
                if args and isinstance(args[0], ast.Constant) and args[0].value in (99, 99.0):
                    bad.append((rel, "log(99)"))
    assert not bad


def test_the_band_has_one_value_everywhere() -> None:
    assert pytest.approx(math.log(99.0), rel=1e-15) == _taxonomy.SIGMOID_SATURATION_X
    assert stats.SIGMOID_SATURATION_X is _taxonomy.SIGMOID_SATURATION_X
    assert stats.sigmoid_saturation_x is _taxonomy.sigmoid_saturation_x
    t = Thresholds()
    assert (t.sigmoid_saturation, t.tanh_saturation) == (
        _taxonomy.SIGMOID_SATURATION,
        _taxonomy.TANH_SATURATION,
    )
    plots = pytest.importorskip("gradsentry.report.plots", exc_type=ImportError)
    assert plots.SIGMOID_BAND == _taxonomy.SIGMOID_SATURATION_X


def _module(kind: str) -> nn.Module:
    return getattr(nn, kind)()


def test_stats_kernels_follow_the_table() -> None:
    """Every watched kind gets a saturated fraction iff the table gives it a saturation rule, and a dead-unit
    fraction iff it has the dead-unit rule; the sigmoid band is ln 99 in the kernel too."""
    x = torch.linspace(-8, 8, 64).reshape(8, 8)
    for kind in _taxonomy.ACTIVATIONS:
        row = _taxonomy.ACTIVATION_TABLE[kind]
        mod = _module(kind)
        out = stats.activation_stats(kind, x, mod(x), mod)
        assert math.isfinite(float(out[2])) == (row.saturation is not None), kind
        assert math.isfinite(float(out[3])) == row.dead_units, kind
    band = _taxonomy.SIGMOID_SATURATION_X
    edge = torch.tensor([[band - 1e-4, band + 1e-4]])
    assert float(stats.activation_stats("Sigmoid", edge, None)[2]) == 0.5


@pytest.mark.parametrize("kind", sorted(k for k, a in _taxonomy.ACTIVATION_TABLE.items() if a.exact_gain))
def test_init_gain_equals_torch_calculate_gain(kind: str) -> None:
    torch_name = {
        "Sigmoid": "sigmoid",
        "Tanh": "tanh",
        "ReLU": "relu",
        "LeakyReLU": "leaky_relu",
        "SELU": "selu",
    }
    mod = nn.LeakyReLU(0.2) if kind == "LeakyReLU" else _module(kind)
    name, param = init._gain_for(mod)
    want = nn.init.calculate_gain(torch_name[kind], 0.2 if kind == "LeakyReLU" else None)  # type: ignore[arg-type]
    assert nn.init.calculate_gain(name, param if name == "leaky_relu" else None) == want  # type: ignore[arg-type]


def test_init_looks_through_every_normalization_family() -> None:
    class LlamaRMSNorm(nn.Module):  # Hugging Face's, by name
        def __init__(self, n: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(n))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight

    for norm in (nn.BatchNorm1d(4), nn.LayerNorm(4), nn.GroupNorm(2, 4), nn.RMSNorm(4), LlamaRMSNorm(4)):
        model = nn.Sequential(nn.Linear(4, 4), norm, nn.Tanh(), nn.Linear(4, 2))
        (_, _, act), _last = init.layers_with_activations(model)
        assert isinstance(act, nn.Tanh), type(norm).__name__


def test_theory_covers_the_mean_field_rows() -> None:
    assert set(theory.ACTIVATION_TYPES) == {
        getattr(nn, k) for k, a in _taxonomy.ACTIVATION_TABLE.items() if a.mean_field
    }
    assert set(theory.LINEAR_TYPES) == set(_taxonomy.dense_types())
    for kind, row in _taxonomy.ACTIVATION_TABLE.items():
        model = nn.Sequential(nn.Linear(8, 8), _module(kind), nn.Linear(8, 2))
        if row.mean_field:
            assert theory.predict(model, input_second_moment=1.0).layers[0].activation == kind
        else:
            with pytest.raises(theory.TheoryNotApplicable, match="learned or random slopes") as err:
                theory.predict(model, input_second_moment=1.0)
            assert err.value.module == "1"


def _ctx(types: dict[str, str]) -> layer_rules.LayerContext:
    return layer_rules.LayerContext(records=[], t=Thresholds(), depth={}, types=types, activation_types=set())


def test_normalizations_agree() -> None:
    assert check_report.NORM_TYPES is _taxonomy.NORMALIZATION_LAYERS
    assert advice.NORMALIZATION_LAYERS is _taxonomy.NORMALIZATION_LAYERS
    assert advice.SATURATING_ACTIVATIONS is _taxonomy.SATURATING_ACTIVATIONS
    for name in ("BatchNorm2d", "LayerNorm", "RMSNorm", "LlamaRMSNorm", "T5LayerNorm", "MistralRMSNorm"):
        assert _ctx({"a": "Linear", "b": name}).has_normalization, name
    assert not _ctx({"a": "Linear", "b": "ReLU"}).has_normalization
    followed = {cls.__name__ for cls in theory.NORM_TYPES}
    assert followed == {
        n for n, f in _taxonomy.NORMALIZATION_TABLE.items() if f != _taxonomy.INSTANCE and hasattr(nn, n)
    }


def test_weight_families() -> None:
    fam = _taxonomy.weight_family
    assert [fam(m) for m in (nn.Linear(2, 2), nn.Conv2d(1, 1, 3), nn.ConvTranspose2d(1, 1, 3))] == [
        "linear",
        "conv",
        "conv_transpose",
    ]
    assert fam(nn.Embedding(3, 2)) == "embedding" and fam(nn.ReLU()) is None
