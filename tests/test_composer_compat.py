"""The installed Composer is one whose internals ``_composer_compat`` was checked against, and its
one private-name door (``assume_causal_lm``) does what the demo needs and nothing longer."""

from __future__ import annotations

import pytest

composer = pytest.importorskip("composer")
pytest.importorskip("transformers")

from irdro_sampler.integrations import _composer_compat as compat  # noqa: E402


def test_installed_composer_is_a_tested_version():
    assert composer.__version__ in compat.TESTED_VERSIONS, (
        f"Composer {composer.__version__} is not among the checked versions {compat.TESTED_VERSIONS}: read "
        "the internals in _composer_compat.CHECKED_SOURCES, then add the version"
    )


def test_private_internals_are_the_checked_ones():
    now = compat.source_hashes()
    assert set(now) == set(compat.CHECKED_SOURCES)
    changed = compat.changed_internals()
    assert not changed, (
        f"Composer {composer.__version__} changed {changed}: re-check _composer_compat.assume_causal_lm "
        f"(is the patch still needed?), then update CHECKED_SOURCES ({ {k: now[k] for k in changed} })"
    )


def test_assume_causal_lm_builds_the_demo_model_and_restores_composer():
    import composer.models.huggingface as hf_module

    from irdro_sampler.demo.model import ModelConfig, build_composer_model

    original = vars(hf_module)["_is_registered_causal_lm"]
    model = build_composer_model(ModelConfig(n_layer=1, n_embd=16, n_head=2, seq_len=16))
    assert model.shift_labels is True
    assert vars(hf_module)["_is_registered_causal_lm"] is original
    with pytest.raises(RuntimeError, match="inside"):
        with compat.assume_causal_lm():
            assert vars(hf_module)["_is_registered_causal_lm"] is not original
            raise RuntimeError("inside")
    assert vars(hf_module)["_is_registered_causal_lm"] is original  # restored on error too
