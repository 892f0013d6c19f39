"""Size the replacement-aware study's full run: the validation-half CE curve of the post-hoc arm's
pretraining alone (arm (a)'s first half, the study's own ``train_lm``) for a step count and
dropout, printed as one JSON line.

    PYTHONPATH=$PWD python bench/replacement_aware_sizing.py STEPS DROPOUT SEED
"""

import json
import sys
import time
from dataclasses import replace

import torch

from molt_kernels.interp.lm_data import load_pydoc_corpus
from molt_kernels.interp.models.gpt import GPT
from molt_kernels.tools.studies.replacement_aware import QUICK, Curves, train_lm


def main() -> None:
    torch.set_num_threads(1)
    steps, dropout, seed = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
    cfg = replace(QUICK, steps=steps, dropout=dropout, seed=seed)
    corpus = load_pydoc_corpus(seed=seed)
    torch.manual_seed(seed)
    model = GPT(cfg.gpt(len(corpus.vocab)))
    curves = Curves()
    start = time.perf_counter()
    train_lm(model, corpus, cfg, steps, cfg.lr, "pretrain", curves, None, progress=False)
    print(
        json.dumps(
            {
                "steps": steps,
                "dropout": dropout,
                "seed": seed,
                "seconds": time.perf_counter() - start,
                "eval_step": curves.eval_step,
                "validation_ce": [round(v, 3) for v in curves.validation_ce_own],
                "train_ce": [round(v, 2) for v in curves.train_ce],
            }
        )
    )


if __name__ == "__main__":
    main()
