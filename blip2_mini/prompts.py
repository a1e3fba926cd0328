"""The prompt formats of the BLIP-2 paper and its code (LAVIS), as small documented helpers.

BLIP-2 is steered only by the text that follows the soft visual prompt:
- captioning: no prompt at all (pre-trained checkpoints), or "a photo of" (the COCO-finetuned ones were
  trained to continue it);
- zero-shot VQA: "Question: {} Answer:" for OPT, "Question: {} Short answer:" for Flan-T5 (section 4.2);
- chat-like prompting (Fig. 4): earlier turns chained as "Question: {} Answer: {}." before the new question.
"""


def caption_prompt(coco_style: bool = False) -> str | None:
    """None for plain captioning (the processor then writes only the image tokens and BOS)."""
    return "a photo of" if coco_style else None


def vqa_prompt(question: str, family="opt") -> str:
    """family: "opt" (decoder-only), "t5" (Flan-T5), or the loaded model, whose language model decides."""
    question = question.strip()
    if not question:
        raise ValueError("vqa: the question is empty")
    if hasattr(family, "is_encoder_decoder"):  # a Blip2 model
        family = "t5" if family.is_encoder_decoder else "opt"
    if family not in ("opt", "t5"):  # a typo ("flan-t5") must not silently give OPT's format
        raise ValueError(f"vqa: family must be 'opt', 't5' or the model, got {family!r}")
    return f"Question: {question} Short answer:" if family == "t5" else f"Question: {question} Answer:"


def chat_prompt(history: list[tuple[str, str]], question: str, family="opt") -> str:
    """Earlier (question, answer) turns, then the new question, in the paper's chat format."""
    turns = [f"Question: {q.strip()} Answer: {a.strip()}." for q, a in history]
    return " ".join(turns + [vqa_prompt(question, family)])
