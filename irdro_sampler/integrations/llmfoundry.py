"""llm-foundry integration: the ``irdro_text`` train loader.

Installing irdro-sampler registers :func:`build_irdro_text_dataloader` as ``irdro_text`` in llm-foundry's
``llmfoundry_dataloaders`` entry-point group, next to ``irdro`` in ``llmfoundry_algorithms``. A YAML that
trains with llm-foundry's stock ``text`` loader turns IR-DRO on with two changes::

    train_loader:
      name: irdro_text          # was: text; every other key stays as it was
      round_size: 6400          # optional: samples per round (default: 100 global batches)
      dataset: {local: ..., split: train, shuffle: true, max_seq_len: 2048, ...}
    algorithms:
      irdro: {}

The loader is llm-foundry 0.22's ``build_text_dataloader`` with one class swapped: the dataset is
:class:`IRDROTextDataset` (a :class:`~irdro_sampler.integrations.streaming.WeightedStreamingDataset`
and an llm-foundry ``StreamingTextDataset``), and the collator is llm-foundry's ``text_collator`` wrapped
in :class:`~irdro_sampler.IndexListCollate`. Tokenisation (text MDS) and pre-tokenised MDS (``tokens``)
both go through llm-foundry's own code.

Importing this module imports neither llm-foundry nor streaming; they are imported when the loader is
built or :class:`IRDROTextDataset` is first used.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable, Mapping
from typing import Any

from irdro_sampler.indexed import IndexListCollate

__all__ = ["DEFAULT_ROUND_BATCHES", "build_irdro_text_dataloader", "default_round_size"]

#: Without ``round_size``, a round (one streaming epoch; the weights refresh between rounds) is this many
#: global batches.
DEFAULT_ROUND_BATCHES = 100

# A pre-tokenised sample is a tensor, not a dict: it travels to the collator under this key next to its
# index and is handed to llm-foundry's collator as the bare tensor it would have received.
_TOKENS_KEY = "_irdro_tokens"
_INDEX_KEY = "sample_idx"


def default_round_size(device_batch_size: int, world_size: int) -> int:
    """``DEFAULT_ROUND_BATCHES`` global batches of ``device_batch_size`` x ``world_size`` samples."""
    return DEFAULT_ROUND_BATCHES * int(device_batch_size) * int(world_size)


def _with_index(sample: Any, sample_id: int) -> dict[str, Any]:
    """The tokenised sample with its global id re-attached (tokenisation drops every other column)."""
    if isinstance(sample, Mapping):
        if _INDEX_KEY in sample:
            return dict(sample)
        return {**sample, _INDEX_KEY: sample_id}
    return {_TOKENS_KEY: sample, _INDEX_KEY: sample_id}


class _UnwrapTokens:
    """Hands llm-foundry's collator exactly the samples the stock ``text`` loader would (picklable)."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, samples: list[Mapping[str, Any]]) -> Any:
        return self.collate_fn([s[_TOKENS_KEY] if set(s) == {_TOKENS_KEY} else s for s in samples])


def _make_dataset_class() -> type:
    from llmfoundry.data.text_data import StreamingTextDataset

    from irdro_sampler.integrations.streaming import WeightedStreamingDataset

    class IRDROTextDataset(WeightedStreamingDataset, StreamingTextDataset):
        """llm-foundry's ``StreamingTextDataset`` drawn in IR-DRO rounds.

        Keyword arguments: those of :class:`WeightedStreamingDataset` (``round_size``, ``seed``,
        ``draws``, ...) plus those of ``StreamingTextDataset`` (``tokenizer``, ``max_seq_len``,
        ``token_encoding_type``, streaming's). Each sample is llm-foundry's tokenised sample as a dict
        plus ``sample_idx`` (a pre-tokenised sample's tensor goes under a private key that
        :func:`build_irdro_text_dataloader`'s collator unwraps).
        """

        def __getitem__(self, idx: int) -> dict[str, Any]:
            # StreamingTextDataset.__getitem__ reads the sample through WeightedStreamingDataset.get_item
            # (which adds sample_idx) and tokenises it, which drops every column but the tokens: put the
            # id back, or IRDRO finds no index in the batch.
            sample_id = operator.index(idx)  # streaming asks for non-negative global ids
            return _with_index(super().__getitem__(sample_id), sample_id)

    IRDROTextDataset.__module__ = __name__
    return IRDROTextDataset


_DATASET_CLASS: type | None = None


def __getattr__(name: str) -> Any:
    # The class subclasses llm-foundry's, so it is built on first use (picklable under this module's name).
    global _DATASET_CLASS
    if name == "IRDROTextDataset":
        if _DATASET_CLASS is None:
            _DATASET_CLASS = _make_dataset_class()
        return _DATASET_CLASS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_irdro_text_dataloader(
    tokenizer: Any,
    device_batch_size: int | float,
    dataset: dict[str, Any],
    drop_last: bool,
    num_workers: int,
    pin_memory: bool = True,
    prefetch_factor: int = 2,
    persistent_workers: bool = True,
    timeout: int = 0,
    round_size: int | None = None,
    draws: str = "balanced",
    seed: int | None = None,
) -> Any:
    """llm-foundry's ``text`` loader over an :class:`IRDROTextDataset`; returns a Composer ``DataSpec``.

    Same arguments as llm-foundry 0.22's ``build_text_dataloader`` (``dataset`` holds ``local``/
    ``remote``/``streams``, ``split``, ``shuffle``, ``shuffle_seed``, ``max_seq_len``,
    ``eos_token_id``, ... ) plus:

    * ``round_size``: samples per round over all ranks (one streaming epoch; IRDRO pushes new weights
      between rounds). Default ``None``: :data:`DEFAULT_ROUND_BATCHES` (100) global batches, rounded up
      as :class:`WeightedStreamingDataset` requires.
    * ``draws``: ``'balanced'`` (default) or ``'iid'``; ``seed``: seed of the draws (default: the
      dataset's ``shuffle_seed``).

    Refused like in :class:`WeightedStreamingDataset`: ``epoch_size``, stream ``proportion``/``repeat``/
    ``choose``, ``replication`` > 1, ``batching_method`` other than ``random``.

    (Longer than a function here should be on purpose: its body follows llm-foundry 0.22's
    ``build_text_dataloader`` step for step, so that it reads side by side with it when llm-foundry moves.)
    """
    from composer.utils import dist
    from llmfoundry import registry
    from llmfoundry.data.text_data import StreamingTextDataset, build_streams
    from llmfoundry.utils.registry_utils import construct_from_registry
    from streaming import StreamingDataset
    from torch.utils.data import DataLoader

    if tokenizer is None:
        raise ValueError("tokenizer: required for the irdro_text loader (as for llm-foundry's text loader)")
    dataset_cfg = dict(dataset)
    # From here to the DataLoader: llm-foundry's build_text_dataloader, with IRDROTextDataset.
    dataset_cfg["replication"], dataset_batch_size = construct_from_registry(
        name="dataset_replication_validator",
        registry=registry.dataset_replication_validators,
        partial_function=False,
        kwargs={"dataset_cfg": dataset_cfg, "tokenizer": tokenizer, "device_batch_size": device_batch_size},
    )
    streams = build_streams(streams=dataset_cfg.pop("streams") if "streams" in dataset_cfg else None)
    dataset_class = __getattr__("IRDROTextDataset")
    valid = set(inspect.signature(StreamingTextDataset).parameters) | set(inspect.signature(StreamingDataset).parameters)
    if round_size is None:
        round_size = default_round_size(dataset_batch_size, dist.get_world_size())
    text_dataset = dataset_class(
        tokenizer=tokenizer,
        streams=streams,
        batch_size=dataset_batch_size,
        round_size=round_size,
        draws=draws,
        seed=seed,
        **{k: v for k, v in dataset_cfg.items() if k in valid},
    )
    dataloader_cfg = {
        "name": "text",
        "dataset": dataset_cfg,
        "drop_last": drop_last,
        "num_workers": num_workers,
        "pin_memory": pin_memory,
        "prefetch_factor": prefetch_factor,
        "persistent_workers": persistent_workers,
        "timeout": timeout,
    }
    collate_fn, dataloader_batch_size = construct_from_registry(
        name="text_collator",
        registry=registry.collators,
        partial_function=False,
        kwargs={"dataloader_cfg": dataloader_cfg, "tokenizer": tokenizer, "dataset_batch_size": dataset_batch_size},
    )
    dl = DataLoader(
        text_dataset,
        collate_fn=IndexListCollate(_UnwrapTokens(collate_fn), index_key=_INDEX_KEY),
        batch_size=dataloader_batch_size,
        drop_last=drop_last,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        persistent_workers=persistent_workers and num_workers > 0,
        timeout=timeout,
    )
    return construct_from_registry(
        name="data_spec",
        registry=registry.data_specs,
        partial_function=False,
        kwargs={"dl": dl, "dataset_cfg": dataset_cfg},
    )
