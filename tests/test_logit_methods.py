"""One base for the logit methods (issue 48 §4): a method on the teacher's logits is a
:class:`~kdcache.methods.logit_base.LogitMethod` subclass that writes its loss and nothing else, and
takes the temperature and the teacher-aware options (``mask``, ``min_confidence``, ``rectify``,
``class_weights`` …) with their bounds, setup and prepare steps from the base.

A new method of a few lines is registered here and checked through what a user reaches: its
options as the command line and config files see them, its losses under ``mask``, ``rectify`` and
class weights against a float64 computation by hand. The negative controls: the same loss on a
plain ``KDMethod`` takes no ``mask``, and the batch is written so that each option changes the
loss. ``kl``, ``dist`` and ``cwd`` are checked to hold no teacher-aware plumbing of their own.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from kdcache.cli.base import defaults_text
from kdcache.cli.parse import parse_method
from kdcache.core.errors import KDCacheError
from kdcache.methods import (
    METHODS,
    KDMethod,
    MethodError,
    build_method,
    check_spec,
    fill_in,
    method_options,
    methods_taking,
    option_bounds,
    option_default,
)
from kdcache.methods.logit_base import TEACHER_AWARE_OPTIONS, LogitMethod, student_and_dense_teacher
from kdcache.methods.teacher_aware import rectified_indices
from kdcache.models import ModelOutput

C, K = 5, 2


class ProbMSE(LogitMethod):
    """A new logit method: the squared distance between softened probabilities, per cell."""

    def loss(self, out, batch):
        s, t = student_and_dense_teacher(out, batch)
        T = self.temperature
        per_cell = (torch.softmax(s / T, 1) - torch.softmax(t / T, 1)).pow(2).sum(1)
        return self.weight * self.cell_mean(per_cell, batch)


class SharpMSE(ProbMSE):
    """One with an option of its own and a temperature default of its own."""

    default_temperature = 2.0

    def __init__(self, power: float = 1.0, **options):
        super().__init__(**options)
        self.power = float(power)


class PlainMSE(KDMethod):
    """The same loss on a plain KDMethod: the negative control."""

    def __init__(self, weight: float | None = None, temperature: float = 1.0):
        super().__init__(weight)
        self.temperature = temperature

    def required(self, schema=None):
        return ["logits"]

    def forward(self, out, batch):
        s, t = student_and_dense_teacher(out, batch)
        T = self.temperature
        per_cell = (torch.softmax(s / T, 1) - torch.softmax(t / T, 1)).pow(2).sum(1)
        return self.weight * per_cell[~batch["kd/ignore"]].mean()


@pytest.fixture
def registered(monkeypatch):
    """The three test methods in the registry for one test (taken back after it)."""
    for name, cls in (("prob_mse", ProbMSE), ("sharp_mse", SharpMSE), ("plain_mse", PlainMSE)):
        monkeypatch.setattr(cls, "name", name)
        monkeypatch.setitem(METHODS._items, name, cls)


def _batch() -> dict:
    """One 4 x 6 crop over a 2 x 3 grid of top-2 + tail teacher cells.

    Cell labels:            [[0, 1, 255], [2, 3, 4]]
    Teacher top-1 per cell: [[0, 2, 1],   [2, 0, 4]]  (wrong at (0, 1) and (1, 1))"""
    label = torch.full((1, 4, 6), 7, dtype=torch.int64)
    for (r, c), v in {(0, 0): 0, (0, 1): 1, (0, 2): 255, (1, 0): 2, (1, 1): 3, (1, 2): 4}.items():
        label[0, 2 * r + 1, 2 * c + 1] = v
    top1 = torch.tensor([[0, 2, 1], [2, 0, 4]])
    indices = torch.stack([top1, (top1 + 1) % C])[None].to(torch.uint8)
    values = torch.tensor([[[6.0, 5.0, 0.4], [4.0, 7.0, 0.3]], [[1.0, 0.5, 0.2], [0.0, 1.0, 0.1]]])[None]
    tail = torch.tensor([[[0.0, -1.0, 0.9], [0.5, 0.0, 0.8]]])
    return {"label": label, "kd/values": values.half(), "kd/indices": indices, "kd/tail": tail.half(),
            "kd/ignore": torch.zeros(1, 2, 3, dtype=torch.bool)}


KEEP = torch.tensor([[True, False, True], [True, False, True]])  # the cells mask=teacher_correct keeps


def _student() -> torch.Tensor:
    return torch.randn(1, C, 2, 3, generator=torch.Generator().manual_seed(5)) * 2


def _per_cell(b: dict, s: torch.Tensor, T: float) -> torch.Tensor:
    """The loss's per-cell terms [h, w] in float64, the dense teacher written out: its top k at their
    logits, every other class at tail − log(C − k)."""
    v, i, t = b["kd/values"].double(), b["kd/indices"].long(), b["kd/tail"].double()
    teacher = (t - math.log(C - K))[:, None].expand(1, C, *t.shape[-2:]).clone().scatter(1, i, v)
    return (torch.softmax(s.double() / T, 1) - torch.softmax(teacher / T, 1)).pow(2).sum(1)[0]


def _loss(method: KDMethod, b: dict, s: torch.Tensor) -> torch.Tensor:
    return method(ModelOutput(logits=s.clone()), b).double()


def test_a_new_logit_method_takes_the_options_of_the_base_with_no_code_of_its_own(registered):
    assert list(method_options("prob_mse")) == ["weight", "temperature", *TEACHER_AWARE_OPTIONS, "standardize"]
    assert list(TEACHER_AWARE_OPTIONS) == ["mask", "min_confidence", "class_weights", "baseline", "teacher_iou",
                                           "margin", "rectify"]
    # its own option sits before the teacher-aware ones and standardize, as kl's tail and dist's beta and gamma do
    assert list(method_options("sharp_mse")) == ["weight", "temperature", "power", *TEACHER_AWARE_OPTIONS,
                                                 "standardize"]
    assert list(method_options("kl")) == ["weight", "temperature", "tail", *TEACHER_AWARE_OPTIONS, "standardize"]
    assert {"prob_mse", "sharp_mse"} <= set(methods_taking("mask")) and "plain_mse" not in methods_taking("mask")
    assert option_bounds("prob_mse") == option_bounds("cwd") == {
        "weight": ">= 0", "min_confidence": "[0, 1)", "margin": "> 0", "temperature": "[0.01, 100]"}
    # defaults: the base's temperature, or the class's default_temperature, as the help shows them
    assert option_default("prob_mse", "temperature") == 1.0 and option_default("sharp_mse", "temperature") == 2.0
    assert "prob_mse 1" in defaults_text("temperature") and "sharp_mse 2" in defaults_text("temperature")
    # the command line's spec, a shorthand filling it in, the build, and the bounds checked first
    spec = parse_method("sharp_mse:mask=teacher_correct,power=3")
    check_spec(spec)
    (spec,) = fill_in([spec], temperature=4.0, weight=None)
    m = build_method(**spec)
    assert (m.aware.mask, m.power, m.temperature, m.weight) == ("teacher_correct", 3.0, 4.0, 1.0)
    assert repr(m) == ("SharpMSE(weight=1.0, temperature=4.0, power=3.0, mask=teacher_correct, min_confidence=0.0, "
                       "rectify=none, class_weights=none)")
    with pytest.raises(KDCacheError, match="min_confidence must be a finite number in"):
        build_method("prob_mse", min_confidence=1.0)
    with pytest.raises(KDCacheError, match="mask must be one of none, teacher_correct"):
        build_method("prob_mse", mask="teacher_wrong")
    with pytest.raises(KDCacheError, match="class_weights=baseline needs baseline=RUN"):
        build_method("prob_mse", class_weights="baseline")
    # built directly, positional arguments included: bound to the same options, bounds checked
    assert SharpMSE(0.5, 3.0, 2.0, "teacher_correct").aware.mask == "teacher_correct"
    assert SharpMSE().temperature == 2.0 and ProbMSE().temperature == 1.0
    with pytest.raises(KDCacheError, match=r"temperature must be a finite number in \[0.01, 100\]"):
        SharpMSE(temperature=0.0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'tail'"):
        SharpMSE(tail="bin")


def test_the_negative_control_a_plain_method_takes_no_teacher_aware_option(registered):
    with pytest.raises(MethodError, match="method 'plain_mse' takes no option 'mask'"):
        build_method("plain_mse", mask="teacher_correct")
    b, s = _batch(), _student()
    # the same loss: the plain method's is the base's with no option given
    torch.testing.assert_close(_loss(build_method("plain_mse", temperature=2.0), b, s),
                               _loss(build_method("prob_mse", temperature=2.0), b, s))


def test_the_mask_leaves_out_the_cells_the_teacher_gets_wrong(registered):
    b, s, T = _batch(), _student(), 2.0
    cells = _per_cell(b, s, T)
    plain = _loss(build_method("prob_mse", temperature=T, weight=0.5), b, s)
    masked = _loss(build_method("prob_mse", temperature=T, weight=0.5, mask="teacher_correct"), b, s)
    torch.testing.assert_close(plain, 0.5 * cells.mean(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(masked, 0.5 * cells[KEEP].mean(), rtol=1e-5, atol=1e-7)
    assert abs(float(masked - plain)) > 1e-3  # the batch is one where the mask matters
    # the crop's padding is left out too, with or without the mask
    b["kd/ignore"][0, 0, 0] = True
    torch.testing.assert_close(_loss(build_method("prob_mse", temperature=T, weight=0.5), b, s),
                               0.5 * cells.flatten()[1:].mean(), rtol=1e-5, atol=1e-7)


def test_rectify_hands_the_loss_the_corrected_teacher(registered):
    b, s, T = _batch(), _student(), 1.0
    swapped = {**b, "kd/indices": rectified_indices(b, C)}
    got = _loss(build_method("prob_mse", temperature=T, rectify="swap"), b, s)
    torch.testing.assert_close(got, _per_cell(swapped, s, T).mean(), rtol=1e-5, atol=1e-7)
    assert abs(float(got - _per_cell(b, s, T).mean())) > 1e-3  # the teacher is wrong on two cells
    assert torch.equal(b["kd/indices"], _batch()["kd/indices"])  # the batch itself is left as it was


def test_class_weights_weigh_each_cell_by_its_class(registered):
    b, s, T = _batch(), _student(), 1.0
    m = build_method("prob_mse", temperature=T)
    m.setup({}, type("Schema", (), {"num_classes": C, "classification": None})())
    m.aware.weights = torch.tensor([1.0, 0.5, 0.0, 0.25, 1.0])  # what prepare() sets from a baseline run
    # each cell's class: its label, or the teacher's top-1 where it has none (cell (0, 2): class 1)
    w = torch.tensor([[1.0, 0.5, 0.5], [0.0, 0.25, 1.0]], dtype=torch.float64)
    cells = _per_cell(b, s, T)
    torch.testing.assert_close(_loss(m, b, s), (cells * w).sum() / w.sum(), rtol=1e-5, atol=1e-7)
    assert abs(float(_loss(m, b, s) - cells.mean())) > 1e-3


def test_kl_dist_and_cwd_hold_no_teacher_aware_plumbing():
    """Each declares its loss and its own options only; the base holds the rest (the negative
    control: the check finds the plumbing in a class that repeats it)."""
    def plumbing(cls: type) -> list[str]:
        found = [k for k in ("forward", "setup", "prepare", "extra_repr", "required") if k in vars(cls)]
        init = inspect.unwrap(vars(cls).get("__init__", object.__init__))
        if init.__qualname__ == f"{cls.__qualname__}.__init__":  # written in the class, not the base's wrapped
            own = inspect.signature(init).parameters
            found += [k for k in own if k in (*TEACHER_AWARE_OPTIONS, "temperature", "weight")]
        return found

    for name in ("kl", "dist", "cwd"):
        cls = METHODS.get(name)
        assert issubclass(cls, LogitMethod) and plumbing(cls) == [], name
        assert "TeacherAware" not in vars(inspect.getmodule(cls)), name

    class Repeats(LogitMethod):
        def __init__(self, weight=None, temperature=1.0, mask="none", **options):
            super().__init__(weight, temperature, mask, **options)

        def setup(self, student_channels, schema):
            super().setup(student_channels, schema)

    assert plumbing(Repeats) == ["setup", "weight", "temperature", "mask"]


def test_the_logit_methods_describe_themselves_as_before():
    """``extra_repr`` of kl and dist as each wrote it itself; cwd's now names its options too."""
    assert repr(build_method("kl", mask="teacher_correct", temperature=4)) == (
        "PixelKL(weight=1.0, temperature=4.0, tail=bin, mask=teacher_correct, min_confidence=0.0, rectify=none, "
        "class_weights=none)")
    assert repr(build_method("dist", class_weights="baseline", baseline="x", beta=2)) == (
        "DIST(weight=1.0, temperature=1.0, beta=2.0, gamma=1.0, mask=none, min_confidence=0.0, rectify=none, "
        "class_weights=baseline, baseline=x, teacher_iou=train, margin=0.1)")
    assert repr(build_method("cwd", rectify="swap", weight=2)) == (
        "ChannelWise(weight=2.0, temperature=4.0, mask=none, min_confidence=0.0, rectify=swap, class_weights=none)")
    assert [method_options(n)["temperature"].default for n in ("kl", "dist", "cwd")] == [1.0, 1.0, 4.0]
    assert not build_method("cwd").state_dict() and not build_method("kl", mask="teacher_correct").state_dict()
