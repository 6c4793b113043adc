"""The web UI (Gradio) at /ui: the seven tasks, with progress from the job events and a multi-turn
editing session of an image or a video (each turn edits an earlier output; history strip, branch
from any turn, download)."""

# no `from __future__ import annotations`: Gradio reads the real gr.SelectData annotation
import asyncio
import hmac
from pathlib import Path

from lance_deploy.api_session import EditSession
from lance_deploy.core.optional import require
from lance_deploy.serve.jobs import SUCCEEDED
from lance_deploy.serve.ui_actions import Actions, UIError, history


def _sampler_controls(gr, tab: str):
    with gr.Row():
        seed = gr.Number(42, label="Seed", precision=0, minimum=0, elem_id=f"{tab}-seed")
        n_steps = gr.Number(30, label="Steps", precision=0, minimum=1, maximum=1000, elem_id=f"{tab}-steps")
        cfg = gr.Number(4.0, label="CFG", minimum=0, maximum=100, elem_id=f"{tab}-cfg")
    return seed, n_steps, cfg


def _negative_control(gr, tab: str):
    return gr.Textbox(label="Negative prompt (optional; empty = upstream's CFG without the caption)",
                      elem_id=f"{tab}-negative")


def _side_control(gr, tab: str):
    return gr.Number(0, label="Working side (px; 0 = the preset's)", precision=0, minimum=0, elem_id=f"{tab}-side")


def build_ui(scheduler, out: Path):
    gr = require("gradio")
    act = Actions(scheduler, out)
    tasks = set(scheduler.tasks)

    def guarded(fn):
        """Run an async-generator handler, turning UIError into the toast the user sees."""
        async def run(*args):
            try:
                async for item in fn(*args):
                    yield item
            except UIError as e:
                raise gr.Error(str(e)) from None
        return run

    with gr.Blocks(title="Lance") as ui:
        gr.Markdown(f"## Lance — {scheduler.model_id}\nJobs share the server's queue with the API.")
        last_image = gr.State(None)  # the latest t2i output: a source for the editing session
        last_video = gr.State(None)  # the latest Video tab output ({"mp4", "frames"}): a video session's source

        with gr.Tab("Text to image", elem_id="tab-t2i"):
            prompt = gr.Textbox(label="Prompt", elem_id="t2i-prompt")
            negative = _negative_control(gr, "t2i")
            with gr.Row():
                width = gr.Number(768, label="Width", precision=0, minimum=16, step=16, elem_id="t2i-width")
                height = gr.Number(768, label="Height", precision=0, minimum=16, step=16, elem_id="t2i-height")
            seed, steps, cfg = _sampler_controls(gr, "t2i")
            go = gr.Button("Generate", variant="primary", elem_id="t2i-go")
            status = gr.Markdown(elem_id="t2i-status")
            image = gr.Image(label="Result", type="filepath", interactive=False, elem_id="t2i-image")

            @guarded
            async def t2i(p, w, h, s, n, c, neg):
                async for line, job, e in act.follow(act.t2i(p, w, h, s, n, c, neg)):
                    if e.terminal:
                        path = act.result_path(job)
                        yield path, line, path
                    else:
                        yield gr.skip(), line, gr.skip()

            go.click(t2i, [prompt, width, height, seed, steps, cfg, negative], [image, status, last_image])

        with gr.Tab("Edit session", elem_id="tab-edit"):
            session_dir = gr.State(None)
            parent = gr.State(None)  # None: edit the last turn
            taken = gr.State(None)  # the lossless frames of a taken generated video (its MP4 is not exact)
            kinds = ["image"] + (["video"] if "video_edit" in tasks else [])
            kind = gr.Radio(kinds, value="image", label="Session of", visible=len(kinds) > 1, elem_id="edit-kind")
            with gr.Row():
                source = gr.Image(label="Source image", type="numpy", image_mode="RGB", elem_id="edit-source")
                source_video = gr.Video(label="Source video", sources=["upload"], visible=False,
                                        elem_id="edit-source-video")
                result = gr.Image(label="Current turn", type="filepath", interactive=False, elem_id="edit-result")
                result_video = gr.Video(label="Current turn", interactive=False, visible=False,
                                        elem_id="edit-result-video")
            with gr.Row():
                take = gr.Button("Use the generated image", elem_id="edit-take")
                restart = gr.Button("New session", elem_id="edit-new")
            instruction = gr.Textbox(label="Edit instruction", elem_id="edit-prompt")
            e_seed, e_steps, e_cfg = _sampler_controls(gr, "edit")
            e_side = _side_control(gr, "edit")
            edit = gr.Button("Apply edit", variant="primary", elem_id="edit-go")
            e_status = gr.Markdown(elem_id="edit-status")
            branch = gr.Markdown("Next edit: on the last turn.", elem_id="edit-branch")
            strip = gr.Gallery(label="History (select a turn to branch from it)", columns=8, rows=1, height=200,
                               object_fit="contain", fit_columns=False, allow_preview=False,
                               elem_id="edit-history")
            download = gr.DownloadButton("Download current turn", visible=False, elem_id="edit-download")

            @guarded
            async def run_edit(folder, par, k, src, src_video, frames, text, s, n, c, side):
                session = await act.session(folder, src, k, src_video, frames)
                req = act.edit_request(session, par, text, s, n, c, side)
                async for line, job, e in act.follow(req, keep_frames=session.is_video):
                    if not e.terminal:
                        yield (gr.skip(),) * 6 + (line, gr.skip())
                        continue
                    if job.status != SUCCEEDED:
                        raise UIError(line)
                    index = await asyncio.to_thread(act.record, session, req, job, par)  # writes files (an MP4)
                    path = str(session.view_path(index))
                    shown = (gr.skip(), path) if session.is_video else (path, gr.skip())
                    yield (*shown, history(session), str(session.folder), None,
                           gr.update(value=path, visible=True), line, f"Next edit: on turn {index} (the last).")

            edit.click(run_edit, [session_dir, parent, kind, source, source_video, taken, instruction, e_seed,
                                  e_steps, e_cfg, e_side],
                       [result, result_video, strip, session_dir, parent, download, e_status, branch])

            def pick(folder, evt: gr.SelectData):
                s = EditSession.open(folder)
                t = s.turn(evt.index)
                path = str(s.view_path(t.index))
                shown = (gr.skip(), path) if s.is_video else (path, gr.skip())
                return t.index, *shown, f"Next edit: branches from turn {t.index}."

            strip.select(pick, [session_dir], [parent, result, result_video, branch])

            reset = [session_dir, parent, strip, result, result_video, download, branch, taken]

            def new_session():
                return None, None, [], None, None, gr.update(visible=False), "Next edit: on the last turn.", None

            restart.click(new_session, None, reset)
            source.upload(new_session, None, reset)
            source_video.upload(new_session, None, reset)
            source_video.clear(new_session, None, reset)

            def switch(k):
                image, video = gr.update(visible=k == "image"), gr.update(visible=k == "video")
                label = gr.update(value=f"Use the generated {k}")
                return (image, video, image, video, label) + new_session()

            kind.change(switch, [kind], [source, source_video, result, result_video, take] + reset)

            def take_generated(k, image_path, video):
                if k == "video":
                    if not video:
                        raise gr.Error("generate a video in the 'Video' tab first")
                    return (gr.skip(), video["mp4"]) + new_session()[:-1] + (video["frames"],)
                if not image_path:
                    raise gr.Error("generate an image in the 'Text to image' tab first")
                from lance_deploy.media.io import read_image

                return (read_image(image_path), gr.skip()) + new_session()

            take.click(take_generated, [kind, last_image, last_video], [source, source_video] + reset)

        with gr.Tab("Video", elem_id="tab-video", visible="t2v" in tasks):
            v_task = gr.Radio(["t2v", "i2v", "video_edit"], value="t2v", label="Task", elem_id="video-task")
            v_prompt = gr.Textbox(label="Prompt / instruction", elem_id="video-prompt")
            with gr.Row():
                v_image = gr.Image(label="First frame (i2v)", type="numpy", image_mode="RGB", elem_id="video-image")
                v_video = gr.Video(label="Video to edit (video_edit)", sources=["upload"], elem_id="video-input")
            with gr.Row():
                v_width = gr.Number(848, label="Width (t2v)", precision=0, minimum=16, step=16, elem_id="video-width")
                v_height = gr.Number(480, label="Height (t2v)", precision=0, minimum=16, step=16,
                                     elem_id="video-height")
                v_frames = gr.Number(49, label="Frames (4k+1)", precision=0, minimum=1, maximum=121,
                                     elem_id="video-frames")
            v_seed, v_steps, v_cfg = _sampler_controls(gr, "video")
            v_side = _side_control(gr, "video")
            v_negative = _negative_control(gr, "video")
            v_go = gr.Button("Generate video", variant="primary", elem_id="video-go")
            v_status = gr.Markdown(elem_id="video-status")
            v_out = gr.Video(label="Result", interactive=False, height=360, elem_id="video-result")

            @guarded
            async def video(*args):  # the exact frames are kept too: the edit session can take them
                async for line, job, e in act.follow(await act.video(*args), keep_frames=True):
                    if not e.terminal:
                        yield gr.skip(), line, gr.skip()
                        continue
                    path = act.result_path(job)  # a PNG when one frame was asked for
                    yield path, line, {"mp4": path, "frames": act.kept_frames(job)} if path.endswith(".mp4") else None

            v_go.click(video, [v_task, v_prompt, v_image, v_video, v_width, v_height, v_frames, v_seed, v_steps,
                               v_cfg, v_side, v_negative], [v_out, v_status, last_video])

        with gr.Tab("Ask", elem_id="tab-ask"):
            kinds = [k for k, t in (("image", "x2t_image"), ("video", "x2t_video")) if t in tasks]
            a_kind = gr.Radio(kinds, value=kinds[0], label="About", elem_id="ask-kind")
            with gr.Row():
                a_image = gr.Image(label="Image", type="numpy", image_mode="RGB", elem_id="ask-image")
                a_video = gr.Video(label="Video", sources=["upload"], elem_id="ask-video")
            a_question = gr.Textbox(label="Question", elem_id="ask-question")
            with gr.Row():
                a_tokens = gr.Number(256, label="Max new tokens", precision=0, minimum=1, maximum=4096,
                                     elem_id="ask-tokens")
                a_side = _side_control(gr, "ask")
            a_go = gr.Button("Ask", variant="primary", elem_id="ask-go")
            a_status = gr.Markdown(elem_id="ask-status")
            a_answer = gr.Textbox(label="Answer", lines=4, interactive=False, elem_id="ask-answer")

            @guarded
            async def ask(*args):
                text = ""
                async for line, job, e in act.follow(await act.ask(*args)):
                    text += e.data.get("text", "") if e.type == "token" else ""
                    if e.terminal:
                        act.result_path(job)  # raises on failure
                        text = job.result["text"]
                    yield text, line

            a_go.click(ask, [a_kind, a_image, a_video, a_question, a_tokens, a_side], [a_answer, a_status])
    ui.queue(default_concurrency_limit=16)
    return ui


def mount_ui(app, scheduler, out: Path, *, api_key: str | None = None, max_upload_bytes: int | None = None):
    """Mount the UI at /ui on `app`; with an API key the UI asks for it as the password (any user name)."""
    gr = require("gradio")
    auth = None
    if api_key:
        def auth(_user: str, password: str) -> bool:
            return hmac.compare_digest(password.encode(), api_key.encode())
    root = str(Path(out).resolve())
    return gr.mount_gradio_app(app, build_ui(scheduler, out), path="/ui", auth=auth, allowed_paths=[root],
                               max_file_size=max_upload_bytes, footer_links=[], ssr_mode=False)
