"""Expose the main environment's torch (and what it requires) to a venv that does not see the rest.

Usage: python3 .ci/torch_from_main_env.py VENV_SITE_PACKAGES LINK_DIR

Used by the Hugging Face lane: a venv made with --system-site-packages would also see the main
environment's mosaicml-streaming 0.13, which pins transformers<5, so `pip check` in a transformers-5 venv
could never be clean. Instead LINK_DIR gets symlinks to the top-level modules and .dist-info folders of
torch, numpy and their requirement closure (resolved by this interpreter, the main environment's), and
a .pth file in the venv puts LINK_DIR on its path. pip then sees torch 2.7.0 as installed (nothing is
downloaded twice) and nothing else of the main environment.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import sys
from pathlib import Path

ROOTS = ["torch", "numpy"]


def _name(requirement: str) -> tuple[str, str | None]:
    name = re.match(r"[A-Za-z0-9._-]+", requirement).group(0)
    marker = requirement.split(";", 1)[1] if ";" in requirement else None
    return name, marker


def _applies(marker: str | None) -> bool:
    if marker is None:
        return True
    if "extra" in marker:
        return False
    try:
        from packaging.markers import Marker
    except ImportError:  # pip's vendored copy
        from pip._vendor.packaging.markers import Marker
    return Marker(marker).evaluate()


def closure(roots: list[str]) -> list[md.Distribution]:
    seen: dict[str, md.Distribution] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # an optional requirement the main environment does not have
        seen[key] = dist
        for req in dist.requires or []:
            dep, marker = _name(req)
            if _applies(marker):
                todo.append(dep)
    return list(seen.values())


def main() -> None:
    site, links = Path(sys.argv[1]), Path(sys.argv[2])
    links.mkdir(parents=True, exist_ok=True)
    for dist in closure(ROOTS):
        base = Path(dist.locate_file(""))
        tops = {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        tops.add(Path(dist._path).name)  # the .dist-info folder
        for top in sorted(tops):
            if top == "__pycache__" or top.endswith(".pth"):
                continue
            src, dst = base / top, links / top
            if src.exists() and not dst.exists():
                os.symlink(src, dst)
    (site / "_irdro_main_env_torch.pth").write_text(f"{links}\n")
    print(f"linked {len(list(links.iterdir()))} entries of torch's closure into {links}")


if __name__ == "__main__":
    main()
