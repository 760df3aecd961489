"""Build DeepSpeed's just-in-time ops once, at install time, instead of in every new rank.

On CPU, DeepSpeed compiles its shared-memory all-reduce op (about 40 s on 2 cores) the first
time a process initialises communication. Ranks look for built ops in
:func:`extensions_dir` (inside the virtual environment), which ``make`` fills by running
``python -m tpm_faas.runtime.prebuild``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tpm_faas._extras import require
from tpm_faas.config import path_with_first, search_path, set_process_env, torch_extensions_dir


def extensions_dir() -> Path:
    """Where this environment keeps torch's JIT-built extensions."""
    return Path(sys.prefix) / "torch_extensions"


def use_prebuilt_ops() -> Path:
    """Point torch's extension cache at :func:`extensions_dir` (unless the site chose one).

    The environment's own ``bin/`` goes first on ``PATH`` too: the ninja that built the ops
    must be the one that checks them, or a different ninja version rebuilds everything.
    Both are written into this process's environment because torch's extension builder reads
    ``TORCH_EXTENSIONS_DIR`` from it and finds ninja through ``PATH``.

    :returns: the extensions directory in use
    """
    chosen = torch_extensions_dir() or extensions_dir()
    values = {"TORCH_EXTENSIONS_DIR": str(chosen)}
    bindir = str(Path(sys.executable).parent)
    if search_path()[:1] != [bindir]:
        values["PATH"] = path_with_first(bindir)
    set_process_env(values)
    return chosen


def main() -> int:
    chosen = use_prebuilt_ops()
    t0 = time.monotonic()
    accelerator = require("deepspeed.accelerator", "runtime")

    accel = accelerator.get_accelerator()
    builder = accel.create_op_builder("ShareMemCommBuilder")
    if builder is None:
        print(f"no ops to prebuild for the {accel.device_name()} accelerator")
        return 0
    builder.load()
    print(f"DeepSpeed ops ready in {chosen} ({time.monotonic() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
