"""Registry of slide-level models: register with a decorator, build by name.

    @register_slide_model("abmil", description="...", paper="Ilse et al. 2018", produces_attention=True)
    class ABMIL(SlideModel): ...

    model = create_slide_model("abmil", in_dim=1024, n_classes=2, dropout=0.1)
    encoder = create_slide_model("abmil", in_dim=1024, n_classes=0)   # embedding only: logits (B, 0)

Every entry is a class or factory called as ``factory(in_dim=..., n_classes=..., **kwargs)``; extra
keyword arguments pass straight through, so later model families (HIPT heads, sparse-conv MIL,
LongViT) register the same way.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn

F = TypeVar("F", bound=Callable[..., nn.Module])

#: what a slide model takes as ``x`` in ``forward(x, coords=None, mask=None, labels=None)``:
#: ``features`` (B, N, D) tile features, mask (B, N) (+ (B, N, 2) coords when ``accepts_coords``);
#: ``features_coords`` (B, N, D) tile features whose (B, N, 2) level-0 coords are required
#: (sparse-grid models such as Giga-SSL's SparseConvMIL);
#: ``region_grids`` (B, M, T, D) token grids of M regions, mask (B, M, T) (HIPT's region level);
#: ``image`` (B, 3, H, W) pixels, mask: optional (B, H/p, W/p) token mask (LongViT).
#: :func:`gigaslide.models.slide.inputs.slide_inputs` turns a batch into these arguments.
INPUT_KINDS = ("features", "features_coords", "region_grids", "image")


@dataclass(frozen=True)
class SlideModelInfo:
    """Metadata of one registered slide model: the one place that says which inputs it takes."""

    name: str
    factory: Callable[..., nn.Module]
    description: str
    paper: str
    produces_attention: bool
    accepts_coords: bool = False
    input_kind: str = "features"

    @property
    def needs_coords(self) -> bool:
        """True when the model cannot run without tile coordinates (``input_kind == "features_coords"``)."""
        return self.input_kind == "features_coords"


#: the contract of models built without the registry (a bare ``SlideModel`` subclass)
DEFAULT_INFO = SlideModelInfo(
    name="<unregistered>",
    factory=nn.Module,
    description="",
    paper="",
    produces_attention=False,
)

_REGISTRY: dict[str, SlideModelInfo] = {}
#: deprecated names -> (current name, why); they still build the model, with a FutureWarning
_ALIASES: dict[str, tuple[str, str]] = {
    "max": (
        "feature_max",
        "it takes a feature-wise maximum; the instance-level MIL of Campanella et al. 2019 is 'topk_mil'",
    ),
}


def register_slide_model(
    name: str,
    *,
    description: str,
    paper: str,
    produces_attention: bool,
    accepts_coords: bool = False,
    input_kind: str = "features",
) -> Callable[[F], F]:
    """Decorator registering a slide-model class or factory under ``name``.

    ``input_kind`` (one of :data:`INPUT_KINDS`) says what the model takes; ``features_coords``
    implies ``accepts_coords``. The factory is called as ``factory(in_dim=..., n_classes=..., **kw)``
    and must accept ``n_classes=0`` (an embedding-only model whose logits are (B, 0)).

    Raises:
        ValueError: if ``name`` is already registered (names are global; pick a new one), or
            ``input_kind`` is unknown.
    """
    if input_kind not in INPUT_KINDS:
        raise ValueError(f"slide model {name!r}: input_kind must be one of {INPUT_KINDS}, got {input_kind!r}")

    def decorator(factory: F) -> F:
        if name in _REGISTRY:
            raise ValueError(f"slide model {name!r} is already registered by {_REGISTRY[name].factory!r}")
        _REGISTRY[name] = SlideModelInfo(
            name=name,
            factory=factory,
            description=description,
            paper=paper,
            produces_attention=produces_attention,
            accepts_coords=accepts_coords or input_kind == "features_coords",
            input_kind=input_kind,
        )
        if isinstance(factory, type):  # a registered class knows its contract even when built directly
            factory.slide_model_info = _REGISTRY[name]  # type: ignore[attr-defined]
        return factory

    return decorator


def list_slide_models() -> list[str]:
    """Names of all registered slide models, sorted."""
    return sorted(_REGISTRY)


def get_slide_model_info(name: str) -> SlideModelInfo:
    """Metadata of a registered model; raises KeyError listing the known names.

    A deprecated alias (``max``) warns and returns the model it names now (``feature_max``).
    """
    if name in _ALIASES and name not in _REGISTRY:
        new, why = _ALIASES[name]
        warnings.warn(f"slide model {name!r} is deprecated, use {new!r}: {why}", FutureWarning, stacklevel=3)
        name = new
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown slide model {name!r}; available: {', '.join(list_slide_models())}") from None


def _check_kwargs(info: SlideModelInfo, kwargs: dict[str, Any]) -> None:
    """Reject keyword arguments the factory does not accept, naming the accepted ones."""
    params = inspect.signature(info.factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [k for k, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        options = ", ".join(k for k in accepted if k not in ("in_dim", "n_classes"))
        raise TypeError(f"slide model {info.name!r} got unknown argument(s) {unknown}; it accepts: {options}")


def create_slide_model(name: str, in_dim: int, n_classes: int, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name`` for ``in_dim``-dimensional tile features and ``n_classes`` outputs.

    ``n_classes=0`` builds the model without a classifier (as timm's ``num_classes=0``): its
    ``SlideOutput.logits`` are an empty (B, 0) tensor and ``embedding`` (B, E) is the output.
    The returned module carries ``slide_model_info`` (its :class:`SlideModelInfo`).
    """
    info = get_slide_model_info(name)
    if int(n_classes) < 0:
        raise ValueError(
            f"slide model {name!r}: n_classes must be >= 0 (0 = embedding only), got {n_classes}"
        )
    _check_kwargs(info, kwargs)
    model = info.factory(in_dim=in_dim, n_classes=n_classes, **kwargs)
    model.slide_model_info = info
    return model


def slide_model_info(model: nn.Module) -> SlideModelInfo:
    """The :class:`SlideModelInfo` a model was built with (:data:`DEFAULT_INFO` for unregistered models)."""
    info = getattr(model, "slide_model_info", None)
    return info if isinstance(info, SlideModelInfo) else DEFAULT_INFO
