"""Data for the toy BLIP-2 reproduction: the synthetic Shapes world (images, captions, questions, splits)
and the metrics that score generated text against it. See shapes.py for the full description."""

from .shapes import (
    ALL_PAIRS,
    COLOURS,
    HELD_OUT_PAIRS,
    KINDS,
    NUMBERS,
    PALETTE,
    POSITIONS,
    SIZES,
    SPLITS,
    TRAIN_PAIRS,
    VQA_PROMPT,
    Background,
    Scene,
    Shape,
    ShapesDataset,
    all_texts,
    caption,
    caption_metrics,
    collate,
    image_to_tensor,
    make_scene,
    make_split_scene,
    normalize_answer,
    parse_caption,
    question_type,
    questions,
    render,
    vocabulary,
    vqa_accuracy,
    vqa_prompt,
    vqa_text,
)

__all__ = [
    "ALL_PAIRS", "COLOURS", "HELD_OUT_PAIRS", "KINDS", "NUMBERS", "PALETTE", "POSITIONS", "SIZES", "SPLITS",
    "TRAIN_PAIRS", "VQA_PROMPT", "Background", "Scene", "Shape", "ShapesDataset", "all_texts", "caption",
    "caption_metrics", "collate", "image_to_tensor", "make_scene", "make_split_scene", "normalize_answer",
    "parse_caption", "question_type", "questions", "render", "vocabulary", "vqa_accuracy", "vqa_prompt",
    "vqa_text",
]
