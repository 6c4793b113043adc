"""End-to-end Lance inference: prompts, token sequences, positions, and the task loops.

`tokenizer` wraps the Qwen2 BPE; `prompts` holds the system prompts and the chat
template; `sequence` (with `layout`, `positions`, `uncond`) builds the packed token
sequence of every task, its MRoPE/MaPE positions and its text-CFG branch. The
denoising and understanding loops and `LancePipeline` build on those.
"""
