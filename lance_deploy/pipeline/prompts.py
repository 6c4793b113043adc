"""System prompts and the chat template Lance renders before tokenising.

Upstream (`text_template=true`) renders a Qwen chat with a Jinja template and
`.strip()`s the result; for the messages Lance builds this reduces to plain
concatenation:

    <|im_start|>system\\n{SYS}<|im_end|>\\n<|im_start|>user\\n{USER}<|im_end|>\\n
    <|im_start|>assistant\\n{ASSISTANT}<|im_end|>          (one line; wrapped here)

Every vision item (image or video, ViT or VAE) renders as one placeholder
`<|vision_start|><|video_pad|><|vision_end|>`; the single pad is expanded to the
block's token count after tokenisation.
"""

from __future__ import annotations

from lance_deploy.pipeline.tokenizer import IM_END, IM_START, IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START

VISION_PLACEHOLDER = VISION_START + VIDEO_PAD + VISION_END
"""One vision block as it appears in the rendered prompt (pads collapsed to one)."""

RESERVED_MARKERS = (VISION_START, VISION_END, VIDEO_PAD, IMAGE_PAD)
"""Token strings that must not occur in user text: they would be read as extra vision blocks."""


def _edit_prompt(kind: str) -> str:
    # Exact upstream text, including the U+2019 apostrophes.
    return (
        f"Describe the key features of the input {kind} (color, shape, size, texture, objects, background), "
        f"then explain how the user\u2019s text instruction should alter or modify the {kind}. "
        f"Generate a new {kind} that meets the user\u2019s requirements while maintaining consistency "
        "with the original input where appropriate."
    )


_T2V_PROMPT = (
    "Describe the video by detailing the color, quantity, visible text, shape, size, texture, "
    "spatial relationships and motion/camera movements of the objects and background:"
)

SYSTEM_PROMPTS: dict[str, str] = {
    "t2i": (
        "Describe the image by detailing the color, quantity, text, shape, size, texture, "
        "spatial relationships of the objects and background:"
    ),
    "t2v": _T2V_PROMPT,
    # i2v runs upstream's first-frame-to-video path, which uses the t2v system prompt.
    "i2v": _T2V_PROMPT,
    "image_edit": _edit_prompt("image"),
    "video_edit": _edit_prompt("video"),
}
"""System prompt of each generation task (x2t takes its system prompt from the request)."""


def render_chat(system: str, user: str, assistant: str | None) -> str:
    """Render one system/user/assistant exchange.

    `assistant=None` renders the generation prompt of an understanding request: the
    text ends right after `<|im_start|>assistant\\n`, where decoding starts.
    """
    text = f"{IM_START}system\n{system}{IM_END}\n{IM_START}user\n{user}{IM_END}\n{IM_START}assistant\n"
    if assistant is None:
        return text
    return f"{text}{assistant}{IM_END}"


def render_generation_prompt(task: str, caption: str, n_condition_blocks: int) -> str:
    """Prompt of a generation task: condition blocks, then the caption, then the target block.

    Upstream moves the user text after the visual inputs, so the caption is always
    the last user item; the assistant turn is the single target block.
    """
    user = VISION_PLACEHOLDER * n_condition_blocks + caption
    return render_chat(SYSTEM_PROMPTS[task], user, VISION_PLACEHOLDER)


def render_understanding_prompt(system: str, question: str) -> str:
    """Prompt of an x2t request: `[vision block][question]` as the user turn."""
    return render_chat(system, VISION_PLACEHOLDER + question, None)
