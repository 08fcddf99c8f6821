"""Teacher correction alone: SFT the unpruned teacher on the distillation corpus at ~1/5 of its peak LR.

    accelerate launch recipes/teacher_correction.py --output_dir teacher-corrected --max_steps 50 \
        --original_learning_rate 1e-4 [--model_name_or_path M] [--dataset_path corpus.txt] [--use_lora]

The corrected teacher (LoRA merged back, a plain model) is saved in `<output_dir>/final`. Same as
`hf-minitron correct-teacher`; `recipes/minitron.py --teacher_correction` runs it as the pipeline's first stage.
"""

import sys

from hf_minitron.cli import COMMANDS


if __name__ == "__main__":
    COMMANDS["correct-teacher"](sys.argv[1:])
