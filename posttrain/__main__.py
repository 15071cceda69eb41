"""`python -m posttrain ...` (what `accelerate launch -m posttrain run ...` calls)."""

import os
import sys

# `python -m` puts the working directory on sys.path (and `accelerate launch` may add it again through
# PYTHONPATH). From a clone's root that directory holds the project's top-level `kernels/` folder (installed
# as `posttrain.kernels`), which then shadows Hugging Face's `kernels` library: transformers and diffusers
# import it, and a flow model or a LoRA set-up under DeepSpeed failed with "cannot import name
# 'CUDAProperties' from 'kernels'". The package is installed, so a clone's root is not needed on the path;
# any other working directory (a user's own modules) stays.
_cwd = os.getcwd()
if os.path.isfile(os.path.join(_cwd, "kernels", "__init__.py")) and os.path.isfile(
        os.path.join(_cwd, "posttrain", "__main__.py")):
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _cwd]

from posttrain.cli import main  # noqa: E402

sys.exit(main())
