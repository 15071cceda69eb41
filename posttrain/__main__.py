"""`python -m posttrain ...` (what `accelerate launch -m posttrain run ...` calls)."""

import sys

from posttrain.cli import main

sys.exit(main())
