"""The task vocabulary: the seven Lance tasks and the groups every layer asks about.

What each task loads and its request rules live in `pipeline.tasks`; this module only names them.
"""

from __future__ import annotations

GENERATION_TASKS = ("t2i", "t2v", "i2v", "image_edit", "video_edit")
UNDERSTANDING_TASKS = ("x2t_image", "x2t_video")
TASKS = GENERATION_TASKS + UNDERSTANDING_TASKS
VIDEO_TASKS = ("t2v", "i2v", "video_edit", "x2t_video")  # need the video model (Lance_3B_Video)
OUTPUT_FRAME_TASKS = ("t2v", "i2v")  # the user chooses the output's frame count
INPUT_VIDEO_TASKS = ("video_edit", "x2t_video")  # frames come from the input clip
VIDEO_OUTPUT_TASKS = ("t2v", "i2v", "video_edit")  # write an MP4
EDIT_TASKS = ("image_edit", "video_edit")


def output_extension(task: str, frames: int | None) -> str:
    """What a task's result is written as: txt for an x2t answer, mp4 for a video, png for one frame."""
    if task in UNDERSTANDING_TASKS:
        return "txt"
    return "mp4" if task in VIDEO_OUTPUT_TASKS and frames != 1 else "png"
