"""Draw schemes: how a global batch is drawn from the samples' masses. One scheme per module, chosen
by name (``IRDROSampler(draws=...)``); the first registered is the default."""

from .balanced import BalancedDraws  # noqa: I001 -- registration order: the default first
from .base import DrawScheme, draw_scheme_class, draw_scheme_names, register_draw_scheme
from .iid import IIDDraws

__all__ = ["BalancedDraws", "DrawScheme", "IIDDraws", "draw_scheme_class", "draw_scheme_names", "register_draw_scheme"]


def scheme_for_state_entry(entry: object) -> type:
    """The registered scheme whose saved part ``state['balanced']`` is ``entry``."""
    from .base import _REGISTRY

    for cls in _REGISTRY.values():
        if cls.owns_state_entry(entry):
            return cls
    raise ValueError(f"no draw scheme saves state_dict['balanced'] of type {type(entry).__name__}")
