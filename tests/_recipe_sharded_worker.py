"""`accelerate launch --config_file recipes/accelerate/{fsdp2,zero3}.yaml _recipe_sharded_worker.py <recipe flags>` on
CPU: the recipe under the shipped accelerate configs, with accelerate's GPU-only FSDP / DeepSpeed switch applied to the
CPU process group (see `_sharded_distill_worker.py`)."""

import os
import sys


sys.path.insert(0, os.path.dirname(__file__))

from _sharded_distill_worker import _enable_deepspeed_on_cpu, _enable_fsdp_on_cpu  # noqa: E402


if __name__ == "__main__":
    os.environ["ACCELERATE_USE_CPU"] = "true"  # a gloo process group on this GPU-less machine
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        _enable_deepspeed_on_cpu()
    else:
        _enable_fsdp_on_cpu()
    from hf_minitron.cli import run_recipe

    run_recipe(sys.argv[1:])
