"""blip2_mini: a from-scratch, readable PyTorch implementation of BLIP-2 that loads the official checkpoints.

    import blip2_mini
    model, processor = blip2_mini.load("weights/blip2-opt-2.7b", dtype=torch.bfloat16, device="cuda")
    inputs = processor(images=image, text="Question: what is in the picture? Answer:")
    ids = model.generate(**inputs, max_new_tokens=20)
    print(processor.batch_decode(ids))

One file per stage: patch_embed.py -> vit.py -> qformer.py -> projection.py -> opt.py / t5.py, tied together
in model.py; decode.py generates text; loader.py maps the official weights; processing.py prepares inputs.
"""

from .config import Blip2Config
from .loader import CheckpointError, load, load_model
from .model import Blip2

__all__ = ["Blip2", "Blip2Config", "CheckpointError", "load", "load_model"]
__version__ = "0.1.0"
