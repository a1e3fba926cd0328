"""Toy reproduction of BLIP-2's two-stage pre-training (Li et al., 2023, section 3) on the synthetic Shapes world.

BLIP-2's idea is to bootstrap from two models that are *already trained and stay frozen*: an image encoder and
a language model. Only the small Q-Former (and one projection) is trained, in two stages. The recipe, one file
per step, in the order `run.py` calls them:

    frozen.py    the two frozen parts, pre-trained first: a small ViT (vit.py architecture) trained to name
                 the shapes in each cell, and a small OPT (opt.py architecture) trained as a language model on
                 the captions and answers, with a byte-level BPE vocabulary from our own trainer (bpe.py)
    stage1.py    representation learning: the Q-Former against the frozen ViT with the three losses of the
                 paper (ITC, ITM with hard negatives, ITG) and their three self-attention masks
    stage2.py    generative learning: Q-Former + projection trained through the frozen OPT with the language
                 modelling loss (and the prefix variant: a question prompt is context, only the answer is scored)
    export.py    save in the official checkpoint layout (Blip2ForConditionalGeneration / ...ImageTextRetrieval)
    evaluate.py  caption exact match and per-attribute accuracy, VQA accuracy, retrieval recall@1
    run.py       the whole recipe: `python -m blip2_mini pretrain [--out DIR] [--quick]`
"""
