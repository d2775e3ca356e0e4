"""The base of the methods that distil the teacher's logits (``kl``, ``dist``, ``cwd``): their
temperature and the teacher-aware options, declared once.

A logit method is a :class:`LogitMethod` subclass that writes its loss, :meth:`LogitMethod.loss`.
It takes, with no code of its own, ``weight``, ``temperature`` (default
:attr:`LogitMethod.default_temperature`), the teacher-aware options of
:class:`~kdcache.methods.teacher_aware.TeacherAware` (``mask``, ``min_confidence``,
``class_weights``, ``baseline``, ``teacher_iou``, ``margin``, ``rectify``), with their bounds, their
setup and prepare steps, and its ``extra_repr``, and ``standardize`` (logit standardisation, below). Options of its own go in its constructor before
``**options``, which carries the base's::

    @METHODS.register("mine")
    class Mine(LogitMethod):
        default_temperature = 2.0

        def __init__(self, beta: float = 1.0, **options):
            super().__init__(**options)
            self.beta = float(beta)

        def loss(self, out, batch):
            s, t = student_and_dense_teacher(out, batch)
            per_cell = ...  # [N, h, w]
            return self.weight * self.cell_mean(per_cell, batch)

Its options are then ``weight, temperature, beta, mask, …, rectify, standardize`` in that order, as the
command line, config files and :func:`~kdcache.methods.base.method_options` see them (the class's
constructor reports that signature; a method built directly binds its arguments to it, positional
ones included, and takes the class's defaults for the rest).

**Logit standardisation** (``standardize=true``; Sun et al., "Logit Standardization in Knowledge
Distillation", CVPR 2024): before the loss sees them, the student's logits (at the cache's
resolution) and the teacher's are z-scored per position over the classes,
Z(z) = (z − mean_c z) / (std_c z + ε) (:func:`~kdcache.core.topk.zscore`: the standard deviation with
Bessel's correction and ε = 1e-7, as the authors' code), and the method's ``temperature`` divides
them as the paper's base temperature (its experiments: 2, with a KD weight of 9). The teacher's
C logits are its cached top k plus the C − k classes outside them as equal shares of the tail
(:func:`~kdcache.core.topk.standardized_topk`, exact for a dense cache): the method is handed
standardised ``kd/values`` and ``kd/tail`` of the same form, so ``kl``'s kernel and the dense rebuild of
``dist`` and ``cwd`` need no change. Which cells ``mask``/``min_confidence`` leave out is decided on
the teacher as cached (its top-1 probability at T = 1), before the standardisation. Off by default.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch

from kdcache.core.options import TEMPERATURE_BOUNDS
from kdcache.core.topk import dense_logits, standardized_topk, zscore
from kdcache.methods.base import KDMethod, checked_init, student_logits_at
from kdcache.methods.teacher_aware import BOUNDS as TEACHER_AWARE_BOUNDS
from kdcache.methods.teacher_aware import TeacherAware, weighted_mean

#: the teacher-aware options, in the order a logit method's options end with (before ``standardize``)
TEACHER_AWARE_OPTIONS = tuple(k for k in inspect.signature(TeacherAware.__init__).parameters if k != "self")
#: the base's options that come after a method's own: the teacher-aware ones, then ``standardize``
TRAILING_OPTIONS = (*TEACHER_AWARE_OPTIONS, "standardize")
#: the batch key under which :meth:`LogitMethod.forward` hands the loss the cells it leaves out, when it
#: decided them before standardising the teacher
_IGNORED = "kd/loss/ignored"


def student_and_dense_teacher(out, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's logits at the cache's resolution and the teacher's rebuilt dense logits
    (:func:`kdcache.core.topk.dense_logits`), both [N, C, h, w] fp32."""
    values = batch["kd/values"]
    C = out.logits.shape[1]
    s = student_logits_at(out.logits, tuple(values.shape[-2:]))
    return s, dense_logits(values, batch["kd/indices"], batch.get("kd/tail"), C)


class LogitMethod(KDMethod):
    """A method that compares the student's logits with the cached teacher's (``required``:
    ``logits``), with a temperature and the teacher-aware options.

    :meth:`forward` hands :meth:`loss` the batch with the teacher's ids rectified
    (``rectify=swap``) and, with ``standardize``, the student's and the teacher's logits z-scored
    (:meth:`standardized`); the loss reads which cells to use from :meth:`ignored` (the crop's padding
    and the cells ``mask``/``min_confidence`` leave out), and the class weights of
    ``class_weights=baseline`` from :meth:`cell_weights` (per cell) or :meth:`class_weight_values`
    (per class), or takes :meth:`cell_mean`, which applies both."""

    #: the temperature a method of the class takes when given none (its option's default)
    default_temperature = 1.0
    bounds = {**TEACHER_AWARE_BOUNDS, "temperature": TEMPERATURE_BOUNDS}

    def __init__(self, weight: float | None = None, temperature: float = 1.0, mask: str = "none",
                 min_confidence: float = 0.0, class_weights: str = "none", baseline: str | None = None,
                 teacher_iou: str = "train", margin: float = 0.1, rectify: str = "none", standardize: bool = False):
        super().__init__(weight)
        self.aware = TeacherAware(mask=mask, min_confidence=min_confidence, class_weights=class_weights,
                                  baseline=baseline, teacher_iou=teacher_iou, margin=margin, rectify=rectify)
        self.temperature = float(temperature)
        if not isinstance(standardize, bool):
            raise ValueError(f"standardize takes true or false, got {standardize!r}")
        self.standardize = standardize

    def __init_subclass__(cls, **kwargs):
        """Each subclass's constructor reports the options it takes (see the module docstring):
        the parent's options up to ``temperature`` (or its last before the teacher-aware ones), the
        subclass's own, then the teacher-aware options; ``temperature`` defaults to the class's
        :attr:`default_temperature`. A constructor without ``**options`` keeps its own signature."""
        own = cls.__dict__.get("__init__")
        init = own if own is not None else cls.__init__
        super().__init_subclass__(**kwargs)
        signature = _options_signature(cls, own)
        if signature is not None:
            cls.__init__ = checked_init(init, signature)

    def required(self, schema=None) -> list[str]:
        return ["logits"]

    def forward(self, out, batch) -> torch.Tensor:
        batch = self.aware.targets(batch)
        if self.standardize:
            out, batch = self.standardized(out, batch)
        return self.loss(out, batch)

    def standardized(self, out, batch: dict) -> tuple:
        """``out`` with the student's logits at the cache's resolution and z-scored over the classes,
        and ``batch`` with the teacher's ``kd/values`` and ``kd/tail`` z-scored the same way (the tail's
        classes as equal shares), both float32; the cells :meth:`ignored` leaves out are decided first,
        on the teacher as cached."""
        values = batch["kd/values"]
        s = zscore(student_logits_at(out.logits, tuple(values.shape[-2:])))
        v, tail = standardized_topk(values, batch.get("kd/tail"), s.shape[1])
        batch = {**batch, _IGNORED: self.aware.ignore(batch), "kd/values": v}
        if tail is not None:
            batch["kd/tail"] = tail
        return dataclasses.replace(out, logits=s), batch

    def loss(self, out, batch: dict) -> torch.Tensor:
        """The method's weighted loss from the student's output and the batch's ``kd/…`` targets
        (rectified where ``rectify=swap``)."""
        raise NotImplementedError

    def ignored(self, batch: dict) -> torch.Tensor:
        """The cells [N, h, w] (bool) the loss leaves out: ``kd/ignore`` (the crop's padding) and
        those ``mask``/``min_confidence`` drop."""
        return batch[_IGNORED] if _IGNORED in batch else self.aware.ignore(batch)

    def cell_weights(self, batch: dict) -> torch.Tensor | None:
        """Each cell's class weight [N, h, w] under ``class_weights=baseline``; None without."""
        return self.aware.cell_weights(batch)

    def class_weight_values(self) -> torch.Tensor | None:
        """The per-class weights [C] under ``class_weights=baseline`` (set by :meth:`prepare`); None
        without."""
        return self.aware.weights

    def cell_mean(self, values: torch.Tensor, batch: dict) -> torch.Tensor:
        """The mean of per-cell terms ``values`` [N, h, w] over the cells not :meth:`ignored`, each
        weighted by its class's weight under ``class_weights=baseline``; 0 where no cell is used."""
        ignore = self.ignored(batch)
        cells = self.cell_weights(batch)
        return weighted_mean(values, (~ignore).float() if cells is None else cells * ~ignore)

    def setup(self, student_channels, schema) -> None:
        super().setup(student_channels, schema)
        self.aware.setup(schema)

    def prepare(self, sources) -> None:
        self.aware.prepare(sources, self.name)

    def extra_repr(self) -> str:
        """The method's options before the teacher-aware ones (each kept as an attribute of its
        name), then the teacher-aware ones as :meth:`TeacherAware.describe` gives them."""
        own = [k for k in inspect.signature(type(self).__init__).parameters
               if k != "self" and k not in TRAILING_OPTIONS and hasattr(self, k)]
        return ", ".join([*(f"{k}={getattr(self, k)}" for k in own), self.aware.describe(),
                          *(["standardize=True"] if self.standardize else [])])


def _options_signature(cls: type, own) -> inspect.Signature | None:
    """The options of logit method class ``cls`` whose own constructor is ``own`` (None: it
    inherits one): its parent's, its own inserted before the teacher-aware ones and ``standardize``
    (an own option of a parent's name replaces it in place), ``temperature`` defaulting to
    ``cls.default_temperature`` unless its own constructor declares it.
    None where ``own`` takes no ``**options``: its signature is then its own."""
    parent = [p.replace(default=cls.default_temperature) if p.name == "temperature" else p
              for p in inspect.signature(super(cls, cls).__init__).parameters.values()]
    params = [p for p in parent if p.name not in TRAILING_OPTIONS]
    aware = [p for p in parent if p.name in TRAILING_OPTIONS]
    if own is not None:
        mine = list(inspect.signature(own).parameters.values())[1:]
        if not any(p.kind is p.VAR_KEYWORD for p in mine):
            return None
        for p in mine:
            if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                continue
            p = p.replace(kind=p.POSITIONAL_OR_KEYWORD)
            names = [q.name for q in params]
            if p.name in names:
                params[names.index(p.name)] = p
            elif p.name in TRAILING_OPTIONS:
                aware[[q.name for q in aware].index(p.name)] = p
            else:
                params.append(p)
    return inspect.Signature(params + aware)
