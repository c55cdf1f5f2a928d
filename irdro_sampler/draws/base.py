"""The draw-scheme contract and its registry: a new scheme is a new module plus :func:`register_draw_scheme`.

A draw scheme owns the structure that holds every sample's *tilted mass* (what
:func:`~irdro_sampler.weights.masses` gives for its running loss) and turns those masses into the
indices of one global batch. The sampler decides *which* masses and *when* (feedback, refreshes); the
scheme decides *how* a batch is drawn from them and keeps whatever that needs, including its part
of the sampler's saved state and the checks of that part.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

import numpy as np


class DrawScheme(Protocol):
    """What the sampler needs from a draw scheme.

    Masses are float64, finite and >= 0, one per sample. Writes go through :meth:`set_masses` (a few
    samples) or :meth:`leaf_buffer` + :meth:`end_rebuild` (all of them, in place); :attr:`total` is
    their sum as the scheme keeps it (the draw probabilities' normaliser).
    """

    name: ClassVar[str]
    #: Batch ``b`` depends on the batches drawn before it (so skipped batches must be drawn first).
    depends_on_history: ClassVar[bool]
    #: The value saved under ``state['block_size']`` (the sum tree's fanout where there is one).
    block_size: int

    @classmethod
    def options(cls, block_size: int | None = None) -> dict[str, Any]:
        """Validate the sampler's scheme-specific keywords; return those the constructor takes."""

    def config(self) -> dict[str, Any]:
        """The options in force (they enter the sampler's fingerprint)."""

    @property
    def total(self) -> float: ...

    @property
    def rekeys(self) -> int: ...

    @property
    def nbytes(self) -> int:
        """Bytes of the O(N) structures this scheme keeps."""

    def mass_of(self, indices: np.ndarray) -> np.ndarray:
        """The stored masses of ``indices`` (bitwise what was written)."""

    def set_masses(self, indices: np.ndarray, mass: np.ndarray) -> None:
        """Set the masses of sorted, distinct, in-range ``indices`` (checked by the caller)."""

    def begin_rebuild(self, *, rekey: bool) -> None:
        """Called before every mass is rewritten through :meth:`leaf_buffer`."""

    def leaf_buffer(self) -> np.ndarray:
        """The writable masses (length N), filled in place between begin/end_rebuild."""

    def end_rebuild(self, *, rekey: bool) -> None:
        """Called after every mass was rewritten; ``rekey=False`` only when a state brings its own credits."""

    def keep_fresh(self) -> None:
        """Called before a draw that follows no refresh: upkeep that depends on the drift of :attr:`total`."""

    def draw(self, rng: np.random.Generator, size: int, uniform_mix: float, *, commit: bool) -> np.ndarray:
        """The indices of one global batch of ``size``; ``commit=False`` (a stale replay) leaves the
        scheme's state as it was."""

    def state_entry(self) -> dict[str, Any] | None:
        """This scheme's part of the sampler state, saved as ``state['balanced']`` (the key's name predates
        the registry): tensors and numbers only. A scheme registered after ``"balanced"`` saves a dict
        holding ``"scheme": name``, so that a loaded state finds its scheme (:meth:`owns_state_entry`)."""

    @classmethod
    def owns_state_entry(cls, entry: Any) -> bool:
        """Whether a saved ``state['balanced']`` belongs to this scheme."""

    @classmethod
    def check_state_entry(cls, entry: Any, dataset_size: int) -> None:
        """Raise ``ValueError`` naming the entry unless ``entry`` is a well-formed :meth:`state_entry`."""

    def reusable_for(self, block_size: int) -> bool:
        """Whether a load may keep this structure (it is rebuilt from the table) rather than allocate anew."""

    def load_state_entry(self, entry: dict[str, Any] | None) -> None:
        """Restore :meth:`state_entry` (checked by :meth:`check_state_entry`) after the masses were rebuilt."""


_REGISTRY: dict[str, type] = {}


def register_draw_scheme(cls: type) -> type:
    """Make ``cls`` (a :class:`DrawScheme` with a unique ``name``) selectable as ``IRDROSampler(draws=name)``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a draw scheme named {cls.name!r} is already registered ({_REGISTRY[cls.name].__name__})")
    _REGISTRY[cls.name] = cls
    return cls


def draw_scheme_class(name: Any) -> type:
    """The registered scheme called ``name``; ``ValueError`` naming the value otherwise."""
    if not isinstance(name, str) or name not in _REGISTRY:
        names = " or ".join(repr(k) for k in _REGISTRY)
        raise ValueError(f"draws must be {names}, got {name!r}")
    return _REGISTRY[name]


def draw_scheme_names() -> tuple[str, ...]:
    """The registered scheme names, the default first."""
    return tuple(_REGISTRY)
