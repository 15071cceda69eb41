"""`python -m posttrain ...` (what `accelerate launch -m posttrain run ...` calls)."""

import os
import sys

# `python -m` puts the working directory first on sys.path. From a clone's root that directory holds the
# project's top-level `kernels/` folder (installed as `posttrain.kernels`), which would then shadow Hugging
# Face's `kernels` library: diffusers and transformers import it, and a flow model failed to load with
# "cannot import name 'CUDAProperties' from 'kernels'". The package is installed, so the working directory
# is not needed to find it.
if not sys.flags.safe_path and sys.path and os.path.abspath(sys.path[0] or os.curdir) == os.getcwd():
    del sys.path[0]

from posttrain.cli import main  # noqa: E402

sys.exit(main())
