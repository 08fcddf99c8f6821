"""Worker of the teacher-logit cache tests: `python _cache_teacher_worker.py OUT [TOP_K DTYPE ROWS_PER_SHARD]`, also
under `torchrun --nproc_per_node 2` (each rank writes its own shards)."""

import os
import sys

import torch


sys.path.insert(0, os.path.dirname(__file__))

from _distill_utils import make_dataset, make_teacher, make_tokenizer  # noqa: E402

from hf_minitron.distillation import cache_teacher_logits  # noqa: E402


def main(out: str, top_k: int = 16, dtype: str = "float16", rows_per_shard: int = 5) -> None:
    cache_teacher_logits(
        make_teacher(), make_dataset(n=24), out, top_k=top_k, dtype=dtype, tokenizer=make_tokenizer(),
        rows_per_shard=rows_per_shard, batch_size=4, chunk_size=32, show_progress=False,
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], *(int(sys.argv[2]), sys.argv[3], int(sys.argv[4])) if len(sys.argv) > 2 else ())
