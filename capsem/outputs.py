"""The rule of capsem's tools for the files they write: never replace one silently."""

import os

from capsem.errors import ConfigError


def check_out_dir(out_dir, names, tool, overwrite=False):
    """Refuses an `out_dir` that holds any of `names` (unless `overwrite`) or is not a directory.

    Args:
      out_dir: the directory a tool writes into (`--out`).
      names: the file names it would write there.
      tool: the tool's name, for the message (e.g. "visualize.py").
      overwrite: allow replacing them (`--overwrite`).

    Raises:
      ConfigError: naming the first file that exists (or `out_dir`).
    """
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"--out {out_dir} exists and is not a directory")
    if overwrite:
        return
    for name in names:
        path = os.path.join(out_dir, name)
        if os.path.lexists(path):
            raise ConfigError(f"{path} exists: {tool} does not overwrite files; pass "
                              f"--overwrite or another --out")
