"""Build DeepSpeed's just-in-time ops once, at install time, instead of in every new rank.

On CPU, DeepSpeed compiles its shared-memory all-reduce op (about 40 s on 2 cores) the first
time a process initialises communication. Ranks look for built ops in
:func:`extensions_dir` (inside the virtual environment), which ``make`` fills by running
``python -m tpm_faas.runtime.prebuild``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def extensions_dir() -> Path:
    """Where this environment keeps torch's JIT-built extensions."""
    return Path(sys.prefix) / "torch_extensions"


def use_prebuilt_ops() -> None:
    """Point torch's extension cache at :func:`extensions_dir` (unless the site chose one).

    The environment's own ``bin/`` goes first on ``PATH`` too: the ninja that built the ops
    must be the one that checks them, or a different ninja version rebuilds everything.
    """
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir()))
    bindir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != bindir:
        os.environ["PATH"] = os.pathsep.join([bindir, path])


def main() -> int:
    use_prebuilt_ops()
    t0 = time.monotonic()
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    builder = accel.create_op_builder("ShareMemCommBuilder")
    if builder is None:
        print(f"no ops to prebuild for the {accel.device_name()} accelerator")
        return 0
    builder.load()
    print(
        f"DeepSpeed ops ready in {os.environ['TORCH_EXTENSIONS_DIR']} "
        f"({time.monotonic() - t0:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
