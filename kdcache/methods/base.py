"""The shape every distillation method has, the method registry, and helpers methods share."""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from torch import nn

from kdcache.core.errors import KDCacheError
from kdcache.core.options import check_number
from kdcache.core.registry import Registry
from kdcache.models import ModelOutput
from kdcache.store.schema import CacheSchema


class MethodError(KDCacheError):
    """A method asked for something the cache or the student does not have."""


#: name -> KDMethod subclass; ``@METHODS.register("name")`` sets the class's ``name``
METHODS: Registry[type[KDMethod]] = Registry("KD method", MethodError)


def method_options(name: str) -> dict[str, inspect.Parameter]:
    """The options of method ``name``: its constructor's keyword arguments."""
    params = inspect.signature(METHODS.get(name).__init__).parameters
    return {k: p for k, p in params.items() if k != "self" and p.kind is p.POSITIONAL_OR_KEYWORD}


def option_default(name: str, option: str):
    """The default of ``option`` of method ``name`` (a weight left at None is the method's
    ``default_weight``)."""
    default = method_options(name)[option].default
    if option == "weight" and default is None:
        return METHODS.get(name).default_weight
    return default


def task_defaults(name: str, task: str, mix: str | None = None) -> dict:
    """The options of method ``name`` whose default differs for ``task`` ("segmentation" or
    "classification"): its :attr:`KDMethod.task_defaults` entry, and for a student that mixes its
    crops (``mix`` "cutmix" or "mixup") the ``"<task> <mix>"`` entry over it where there is one."""
    own = METHODS.get(name).task_defaults
    return {**own.get(task, {}), **(own.get(f"{task} {mix}", {}) if mix and mix != "none" else {})}


def settings_at_defaults(name: str, task: str, mix: str | None = None) -> dict:
    """Every option of method ``name`` as a student given only the name takes it for ``task`` (and
    its ``--mix``): the constructor's defaults, then the task's (:func:`task_defaults`)."""
    return {**{o: option_default(name, o) for o in method_options(name)}, **task_defaults(name, task, mix)}


def at_defaults(spec: dict, task: str, mix: str | None = None) -> bool:
    """Whether the method spec ``spec`` (``{"name": …, option: value}``) sets every option it names to
    the value :func:`settings_at_defaults` gives for ``task`` and ``mix`` (the taps name modules,
    not settings)."""
    defaults = settings_at_defaults(spec["name"], task, mix)
    return all(k in defaults and defaults[k] == v for k, v in spec.items() if k != "name" and not k.endswith("_tap"))


def with_task_defaults(methods: list[dict], task: str, mix: str | None = None) -> list[dict]:
    """Method specs with each method's defaults for ``task`` (and a mixing student's ``mix``) filled
    in where the spec gives no value of its own (an option given on the command line, in a config
    file or by a shorthand such as ``--temperature`` wins): the specs a student's run records and
    trains with."""
    return [{**m, **{k: v for k, v in task_defaults(m["name"], task, mix).items() if k not in m}} for m in methods]


def methods_taking(option: str) -> list[str]:
    """The methods whose constructor takes ``option``."""
    return [name for name in METHODS.names() if option in method_options(name)]


def fill_in(methods: list[dict], **values) -> list[dict]:
    """Method specs (``{"name": ..., option: value}``) with each of ``values`` (option -> value,
    None: not given) filled into every method that takes that option and has none of its own:
    what the command line's shorthands (``--temperature``, ``--kd-weight`` …) do."""
    out = [dict(m) for m in methods]
    for option, value in values.items():
        if value is None:
            continue
        for m in out:
            if option not in m and option in method_options(m["name"]):
                m[option] = value
    return out


def option_bounds(name: str) -> dict[str, str]:
    """The declared bounds of method ``name``'s number options (:attr:`KDMethod.bounds`, merged
    over its classes, the subclass's winning)."""
    return _class_bounds(METHODS.get(name))


def _class_bounds(cls: type) -> dict[str, str]:
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        out.update(vars(klass).get("bounds", {}))
    return out


def _check_numbers(cls: type, name: str, options: dict) -> None:
    """Each number option of method class ``cls`` among ``options`` a finite number within its bounds."""
    params = {k: p for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}
    bounds = _class_bounds(cls)
    for key, value in options.items():
        if key not in params or not _takes_number(params[key]) or value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            default = params[key].default if params[key].default not in (None, inspect.Parameter.empty) else 1
            raise MethodError(f"method '{name}': {key} takes a number, got {value!r}; e.g. {name}:{key}={default}")
        check_number(value, f"method '{name}': {key}", bounds.get(key))


def number_options(name: str) -> list[str]:
    """The options of method ``name`` that take a number."""
    return [k for k, p in method_options(name).items() if _takes_number(p)]


def check_options(name: str, options: dict) -> None:
    """Method ``name``'s ``options`` checked before anything is built: known names, and every number
    finite and within its declared bounds; one error naming the method and the option otherwise."""
    params = method_options(name)
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise MethodError(f"method '{name}' takes no option {', '.join(map(repr, unknown))}; its options: "
                          f"{', '.join(params) or 'none'}")
    _check_numbers(METHODS.get(name), name, options)


def check_spec(spec: dict) -> None:
    """A method spec (``{"name": …, option: value}``) checked as :func:`check_options` does."""
    check_options(spec["name"], {k: v for k, v in spec.items() if k != "name"})


def build_method(name: str, **options) -> KDMethod:
    """An instance of method ``name`` with ``options`` (its constructor's keyword arguments)."""
    cls = METHODS.get(name)
    check_options(name, options)
    try:
        return cls(**options)
    except (TypeError, ValueError) as exc:
        raise KDCacheError(f"method '{name}': {exc}") from None


def _takes_number(param: inspect.Parameter) -> bool:
    """Whether a method option is a number: its default is one, or it is annotated ``float``/``int``
    (``weight: float | None = None``)."""
    if isinstance(param.default, bool):
        return False
    if isinstance(param.default, (int, float)):
        return True
    ann = param.annotation if isinstance(param.annotation, str) else getattr(param.annotation, "__name__", "")
    return ann.split("|")[0].strip() in ("float", "int")


class KDMethod(nn.Module):
    """Base class. ``weight`` multiplies the method's loss in L_total = L_seg + Σ w_m · L_m.

    The constructor's keyword arguments are the method's options (``--method NAME:key=value``);
    the command line's shorthands (``--temperature`` …) fill in the methods whose constructor
    takes that argument. ``name`` is set by :data:`METHODS`'s ``register``. A number option
    declares its bounds in :attr:`bounds`; :func:`build_method` (and the command line, config files
    and ``StudentConfig.validate`` through it) refuses NaN, ±inf and values out of bounds before
    the constructor runs, so the constructor checks only what bounds cannot say."""

    name: str = ""
    default_weight = 1.0
    #: the bounds of the method's number options (:class:`~kdcache.core.options.Bounds` texts), each
    #: class declaring its own; every number option is also refused when not finite
    bounds: dict[str, str] = {"weight": ">= 0"}
    #: options whose default differs by task, chosen on val for that task (cite the evidence):
    #: ``{"classification": {"temperature": 4.0}}``, and for a student that mixes its crops,
    #: ``"classification mixup"`` over it; filled into a student's specs by
    #: :func:`with_task_defaults` where they give no value, so the run records what it used
    task_defaults: dict[str, dict] = {}
    #: how the method at its defaults stood against the CE baseline at a full training budget, per
    #: task, in a line (``kdcache list-methods`` shows it); a method at its defaults below the best CE
    #: on val in a study says so here with the results file, and ``tests/test_method_standing.py``
    #: checks each line against that file
    standing: dict[str, str] = {}

    def __init__(self, weight: float | None = None):
        super().__init__()
        self.weight = self.default_weight if weight is None else float(weight)

    def __init_subclass__(cls, **kwargs):
        """A method built directly (``PixelKL(temperature=…)``, not through :func:`build_method`) checks
        its number options against :attr:`bounds` too: each subclass's constructor is wrapped
        (:func:`checked_init`) so that the outermost one checks what it was given before it runs (a
        ``super().__init__`` call does not check again)."""
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None:
            cls.__init__ = checked_init(init)

    def student_taps(self) -> list[str]:
        """Student modules whose outputs this method reads."""
        return []

    def required(self, schema: CacheSchema | None = None) -> list[str]:
        """Cached teacher arrays this method reads: ``logits``, ``features/<tap>``, ``attention/<tap>``;
        ``schema`` is the cache's, where the choice depends on what it holds (``at``: its attention
        maps, or else its features), None for a live teacher, which gives everything."""
        return []

    def setup(self, student_channels: dict[str, int], schema: CacheSchema) -> None:
        """Called once before training with the student taps' channel counts and the schema of
        the cache (or of the online teacher's outputs), e.g. to build an adapter."""

    def prepare(self, sources: list) -> None:
        """Called once before training with the training images' caches: (store, rows) pairs
        (the labelled cache's and each unlabelled one's), e.g. to set thresholds from the whole
        data. Default: nothing."""

    def forward(self, out: ModelOutput, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"weight={self.weight}"


def checked_init(init, signature: inspect.Signature | None = None):
    """``init``, a method class's constructor, wrapped so that, called as the constructor
    of the object's own class (not through ``super().__init__``), it checks the number options it
    was given against the class's bounds before it runs. ``signature``: the options the class
    takes where they are not ``init``'s own (a :class:`~kdcache.methods.logit_base.LogitMethod`
    whose constructor passes ``**options`` on); the wrapper then reports it as its signature,
    binds the arguments to it, fills in its defaults and calls ``init`` with them by name."""
    bind_to = signature or inspect.signature(init)

    @functools.wraps(init)
    def checked(self, *args, **kw):
        if type(self).__init__ is checked:
            bound = bind_to.bind(self, *args, **kw)
            _check_numbers(type(self), type(self).name or type(self).__name__,
                           {k: v for k, v in bound.arguments.items() if k != "self"})
            if signature is not None:
                bound.apply_defaults()
                init(self, **{k: v for k, v in bound.arguments.items() if k != "self"})
                return
        init(self, *args, **kw)

    if signature is not None:
        checked.__signature__ = signature
    return checked


def reads(method: KDMethod, schema: CacheSchema | None) -> list[str]:
    """``method.required(schema)``; a method of your own written when ``required`` took no
    argument is called without it, as it was."""
    try:
        takes_schema = bool(inspect.signature(method.required).parameters)
    except (TypeError, ValueError):
        takes_schema = False
    return method.required(schema) if takes_schema else method.required()


class FeatureMethod(KDMethod):
    """A method that compares one student module's output with one cached teacher tap."""

    def __init__(self, weight: float | None = None, student_tap: str | None = None,
                 teacher_tap: str | None = None):
        super().__init__(weight)
        if not student_tap or not teacher_tap:
            raise ValueError(f"{self.name} needs student_tap=<student module> and teacher_tap=<cached teacher tap>")
        self.student_tap, self.teacher_tap = student_tap, teacher_tap

    def student_taps(self) -> list[str]:
        return [self.student_tap]

    def required(self, schema: CacheSchema | None = None) -> list[str]:
        return [f"features/{self.teacher_tap}"]

    def check_features(self, schema: CacheSchema) -> dict:
        """The cache's description of the teacher tap's features; a clear error if it has none."""
        feats = schema.features
        if self.teacher_tap not in feats:
            raise MethodError(f"method '{self.name}' needs the teacher's '{self.teacher_tap}' features in the "
                              f"cache; build it with --features {self.teacher_tap}")
        return feats[self.teacher_tap]


def student_logits_at(logits: torch.Tensor, size: tuple[int, int], keep_dtype: bool = False) -> torch.Tensor:
    """Student logits brought to the cache's resolution (bilinear), fp32 (or in their own dtype with
    ``keep_dtype``, for a consumer that widens them itself, as the fused kernel does)."""
    if not keep_dtype or logits.dtype == torch.float64:
        logits = logits.float()
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return logits


def valid_mask(ignore: torch.Tensor, size) -> torch.Tensor:
    """1 where a cell is used, 0 in the crop's padding: ``ignore`` [N, h, w] -> float [N, *size]
    (nearest-resized when the sizes differ)."""
    m = (~ignore).float()[:, None]
    return F.interpolate(m, size=size, mode="nearest")[:, 0] if tuple(m.shape[-2:]) != tuple(size) else m[:, 0]


def pool_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Average-pool (or, if smaller, bilinearly resize) a [N, C, h, w] map to ``size``."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def teacher_feature(batch: dict, tap: str, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached teacher feature ``tap`` [N, c, h, w] and its ignore mask [N, h, w]."""
    key = f"kd/features/{tap}"
    if key not in batch:  # setup() refused a cache without them already; a batch made by other code
        raise MethodError(f"method '{method}' was given a batch without {key}: the items must carry the "
                          f"teacher's '{tap}' features (a cache built with --features {tap})")
    return batch[key].float(), batch[f"{key}/ignore"]
