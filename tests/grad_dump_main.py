"""`posttrain` CLI with tests/grad_capture.py installed: for `accelerate launch` in the tests.

    POSTTRAIN_GRAD_DUMP=DIR accelerate launch --config_file recipes/accelerate/ddp.yaml \\
        tests/grad_dump_main.py run RECIPE [overrides]

saves the gradients of the first optimizer step (after the last micro-batch's backward, so
after DDP's all-reduce, before clipping) of rank k to DIR/rank<k>.safetensors.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import grad_capture  # tests/ is sys.path[0]: this script's own folder
from safetensors.torch import save_file


def main() -> int:
    from posttrain.cli import main as cli_main

    dump = Path(os.environ["POSTTRAIN_GRAD_DUMP"])
    records: list = []
    grad_capture.install(records)
    code = cli_main(sys.argv[1:])
    dump.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    save_file({k: v.contiguous() for k, v in records[0]["step_grads"].items()}, str(dump / f"rank{rank}.safetensors"))
    return code


if __name__ == "__main__":
    sys.exit(main())
