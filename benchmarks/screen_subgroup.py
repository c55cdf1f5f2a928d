"""A probe: the first-visit screen on examples/plain_pytorch.py, whose rare group has its own decision boundary.

The screen leaves out a first visit the cut would take. The rare group here has its own decision boundary, which
the model has not learned when the group's hard samples are first visited: their losses lie above the cut, so
they are screened, never trained on at that visit, and their loss does not fall, which is the evidence the gate
that spares what is being learned waits for; the group is then cut and drawn below its share. Prints the
example's result (test loss per group, share of draws) for the defaults and the suite's candidates, without the
screen, with it, and with the block-only screen (`--screen-block`) in the loop (RESULTS_suite_group_z.md):

    python benchmarks/screen_subgroup.py
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from irdro_sampler import IRDROSampler

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "plain_pytorch.py"
VARIANTS = {"defaults": {}, "z = 2.0, gate 0.7": {"truncate_zscore": 2.0, "cut_learned_ratio": 0.7}}


def _example():
    spec = importlib.util.spec_from_file_location("plain_pytorch", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(options: dict, screen: bool | str) -> dict[str, float]:
    """The example at its default seed and flags, its sampler built with ``options``, the loop screening or not
    (``"block"``: only first visits inside a block of unlearnable samples, the example's ``--screen-block``)."""
    ex = _example()

    class Sampler(IRDROSampler):  # the example's sampler with the variant's options
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **options, **kwargs)

    ex.IRDROSampler = Sampler
    return ex.main({False: [], True: ["--screen"], "block": ["--screen-block"]}[screen])


def main() -> None:
    print(f"uniform: {_rounded(_example().main(['--sampler', 'uniform']))}")
    for name, options in VARIANTS.items():
        for screen in (False, True, "block"):
            print(f"{name}, screen={screen}: {_rounded(run(options, screen))}")


def _rounded(result: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 3) for k, v in result.items()}


if __name__ == "__main__":
    main()
