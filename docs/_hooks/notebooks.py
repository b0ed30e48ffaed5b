"""MkDocs hook: render the tutorials in ``notebooks/*.ipynb`` (outside ``docs/``) without copying them.

Each notebook is added to the build as ``notebooks/<name>.ipynb`` read from its own path, before
mkdocs-jupyter turns notebooks into pages, and a nav entry whose value is a glob relative to the
repository root (``- Tutorials: notebooks/*.ipynb``) is expanded into those pages, sorted by name: a
new notebook appears in the site with no change to ``mkdocs.yml``.
"""

from __future__ import annotations

import glob
import os

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

DEST = "notebooks"


def _root(config) -> str:
    return os.path.dirname(os.path.abspath(config.config_file_path))


def _expand(nav, root: str):
    if isinstance(nav, list):
        return [_expand(item, root) for item in nav]
    if isinstance(nav, dict):
        return {key: _expand(value, root) for key, value in nav.items()}
    if isinstance(nav, str) and nav.endswith(".ipynb") and any(c in nav for c in "*?["):
        found = sorted(glob.glob(os.path.join(root, nav)))
        return [f"{DEST}/{os.path.basename(p)}" for p in found]
    return nav


def _notebooks(config) -> list[str]:
    return sorted(glob.glob(os.path.join(_root(config), "notebooks", "*.ipynb")))


def on_config(config):
    if config.nav is not None:
        config.nav = _expand(config.nav, _root(config))
    config.watch.append(os.path.join(_root(config), "notebooks"))
    return config


@event_priority(100)  # before mkdocs-jupyter's on_files, which wraps .ipynb files as pages
def on_files(files, config):
    for path in _notebooks(config):
        # src_dir is the repository root, so the page's source is notebooks/<name>.ipynb itself
        # (File.generated would lose its path inside mkdocs-jupyter's wrapper).
        files.append(File(f"{DEST}/{os.path.basename(path)}", src_dir=_root(config),
                          dest_dir=config.site_dir, use_directory_urls=config.use_directory_urls))
    return files
