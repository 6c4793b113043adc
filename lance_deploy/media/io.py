"""Reading and writing images and videos as uint8 RGB arrays.

Images go through Pillow, videos through the ffmpeg that imageio-ffmpeg bundles.
Every failure a user can cause (a missing, unreadable or corrupt file, a frame
folder without --fps) becomes a one-line `MediaError` / `LanceUsageError` that
names the file; so does an input too large to decode (`MAX_MEDIA_PIXELS`,
Pillow's own `Image.MAX_IMAGE_PIXELS`, `MAX_VIDEO_BYTES`), before it is decoded.
Writes go through `core.fsutil.publish`: a temporary file in the destination
folder, read back (PNG decoded, MP4 one frame), fsynced, then renamed; a
failure leaves the earlier file as it was.
"""

from __future__ import annotations

import errno
import io
import math
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from lance_deploy.core.errors import LanceError, LanceUsageError, MediaError
from lance_deploy.core.fsutil import publish, publish_bytes
from lance_deploy.core.units import GiB, format_bytes

# Frame-folder members we read; anything else (a .txt, a hidden file) is ignored.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})

# H.264 quality of written videos (lower is better; 18 is visually lossless).
VIDEO_CRF = 18

# Input caps, checked from headers before decoding: pixels per image or frame (Pillow's own
# MAX_IMAGE_PIXELS applies too, when it is lower), and the decoded bytes of a whole video
# (every frame is held in memory before 12 fps sampling).
MAX_MEDIA_PIXELS = 8192 * 8192
MAX_VIDEO_BYTES = 4 * GiB


# --------------------------------------------------------------------------- images


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert to RGB the way upstream's dataset does: transparency goes over white."""
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.split()[3])
        return background
    return image.convert("RGB")


def read_image(path) -> np.ndarray:
    """Read an image file as uint8 [H, W, 3] RGB."""
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"image not found: {path}")
    try:
        with warnings.catch_warnings():
            # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that; both are refusals here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                check_pixels(image.width, image.height, path)  # from the header, before decoding
                image.load()  # decode now, so a truncated file fails here and not later
                rgb = _to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise MediaError(f"image {path} is too large to decode safely: {_one_line(exc)}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise MediaError(f"cannot decode image {path}: {_one_line(exc)}") from exc
    return np.asarray(rgb, dtype=np.uint8).copy()


def pixel_cap() -> int:
    """Pixels allowed per image or frame: ours, or Pillow's MAX_IMAGE_PIXELS when that is lower."""
    pil = Image.MAX_IMAGE_PIXELS
    return min(MAX_MEDIA_PIXELS, int(pil)) if pil else MAX_MEDIA_PIXELS


def check_pixels(width: int, height: int, path) -> None:
    """Refuse a frame over `pixel_cap()`, naming the file."""
    cap = pixel_cap()
    if width * height > cap:
        raise MediaError(f"{path} is {width}x{height} = {width * height:,} pixels, over the {cap:,}-pixel "
                         "input limit; downscale it first")


def png_bytes(frame: np.ndarray, text: dict[str, str] | None = None) -> bytes:
    """One uint8 [H, W, 3] frame (or [1, H, W, 3]) as PNG bytes with `text` as tEXt chunks
    (`media.metadata.png_text`)."""
    frame = _png_frame(frame)
    buf = io.BytesIO()
    info = PngImagePlugin.PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, v)  # tEXt; Pillow makes it iTXt (UTF-8) when the text is not Latin-1
    Image.fromarray(frame).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def _png_frame(frame) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.ndim == 4 and frame.shape[0] == 1:
        frame = frame[0]
    _check_uint8_rgb(frame, ndim=3, what="an image")
    return np.ascontiguousarray(frame)


def write_image(frame: np.ndarray, path, text: dict[str, str] | None = None, *, overwrite: bool = True) -> None:
    """Write one uint8 [H, W, 3] frame (or [1, H, W, 3]) as a PNG, atomically, with `text` as tEXt
    chunks. `overwrite=False`: FileExistsError rather than replace a file."""
    frame = _png_frame(frame)
    path = Path(path)
    try:
        data = png_bytes(frame, text)  # in memory: the exact size is known up front
    except OSError as exc:
        raise LanceError(f"cannot write image {path}: {_one_line(exc)}") from exc
    publish_bytes(path, data, what="image", verify=lambda tmp: _check_png(tmp, frame), overwrite=overwrite)


def _check_png(tmp: Path, frame: np.ndarray) -> None:
    """The file decodes to exactly `frame`."""
    with Image.open(tmp) as image:
        image.load()
        back = np.asarray(image.convert("RGB"))
    if not np.array_equal(back, frame):
        raise ValueError(f"decodes to {back.shape[1]}x{back.shape[0]} pixels that differ from the image written")


# --------------------------------------------------------------------------- videos


def read_video(path, fps: float | None = None) -> tuple[np.ndarray, float]:
    """Read a video file or a folder of numbered frames as (uint8 [N, H, W, 3], fps).

    For a video file `fps` overrides the container's frame rate when given. A
    folder has no frame rate, so `fps` is required; its frames are the image
    files sorted by the number in their names (frame_2 before frame_10).
    """
    path = Path(path)
    if fps is not None and not (math.isfinite(fps) and 0 < fps <= 1000):
        raise LanceUsageError(f"--fps {fps}: expected a frame rate in (0, 1000] (for {path})")
    if path.is_dir():
        return _read_frame_folder(path, fps)
    if not path.is_file():
        raise MediaError(f"video not found: {path}")
    still = _still_image_format(path)
    if still:
        raise MediaError(f"cannot decode video {path}: it is a still {still} image (a single frame); give a video file "
                         "(or a folder of frames with --fps), or for a picture use image_edit or x2t_image")
    frames, container_fps = _read_video_file(path)
    return frames, float(fps) if fps is not None else container_fps


def _still_image_format(path: Path) -> str | None:
    """The format of a file that is a single still picture (PNG, JPEG, ...), else None."""
    try:
        with Image.open(path) as img:
            return None if getattr(img, "is_animated", False) else img.format
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        return None


def _frame_number(name: str) -> int | None:
    """The last run of digits in a file stem ("clip_0012.png" -> 12), or None."""
    digits = re.findall(r"\d+", Path(name).stem)
    return int(digits[-1]) if digits else None


def _read_frame_folder(folder: Path, fps: float | None) -> tuple[np.ndarray, float]:
    """Read the numbered image files of a folder, in numeric order."""
    if fps is None:
        raise LanceUsageError(f"{folder} is a folder of frames: pass its frame rate with --fps")
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
             and not p.name.startswith(".")]
    if not files:
        raise MediaError(f"no image frames found in folder {folder}")
    unnumbered = sorted(p.name for p in files if _frame_number(p.name) is None)
    if unnumbered:
        raise MediaError(f"frame {folder / unnumbered[0]} has no frame number in its name")
    # Numeric order, the name breaking ties (e.g. "1.png" vs "01.png").
    files.sort(key=lambda p: (_frame_number(p.name), p.name))
    frames, total = [], 0
    for p in files:
        frames.append(read_image(p))
        total += frames[-1].nbytes
        _check_video_bytes(total, len(frames), frames[-1].shape, folder)
    first = frames[0].shape
    for p, frame in zip(files, frames):
        if frame.shape != first:
            raise MediaError(f"frame {p} is {frame.shape[1]}x{frame.shape[0]}, "
                             f"the first frame is {first[1]}x{first[0]}")
    return np.stack(frames), float(fps)


def _read_video_file(path: Path) -> tuple[np.ndarray, float]:
    """Decode every frame of a video file with ffmpeg; return the frames and the container fps."""
    import imageio_ffmpeg  # deferred: it locates the ffmpeg binary on import

    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    try:
        meta = next(reader)
        width, height = meta["size"]
        check_pixels(width, height, path)
        frames = []
        for buf in reader:  # stops at the cap, long before memory runs out
            frames.append(np.frombuffer(buf, dtype=np.uint8).reshape(height, width, 3))
            _check_video_bytes(len(frames) * frames[0].nbytes, len(frames), frames[0].shape, path)
    except (RuntimeError, OSError, StopIteration, KeyError, ValueError) as exc:
        raise MediaError(f"cannot decode video {path}: {_one_line(exc)}") from exc
    finally:
        reader.close()  # stops ffmpeg if decoding ended early
    if not frames:
        raise MediaError(f"video {path} has no frames")
    container_fps = float(meta.get("fps") or 0.0)
    if not container_fps > 0:
        raise MediaError(f"video {path} has no frame rate: pass one with --fps")
    return np.stack(frames), container_fps


def _check_video_bytes(total: int, count: int, shape, path) -> None:
    if total > MAX_VIDEO_BYTES:
        h, w = shape[:2]
        raise MediaError(f"video {path} decodes to more than {format_bytes(MAX_VIDEO_BYTES)} ({count}+ frames of "
                         f"{w}x{h}); trim or downscale it first, e.g. ffmpeg -i IN -t 6 -vf scale=-2:480 OUT.mp4")


def write_video(frames: np.ndarray, path, fps: int = 12, comment: str | None = None, *,
                overwrite: bool = True) -> None:
    """Write uint8 [T, H, W, 3] frames as an H.264 (yuv420p) MP4, atomically, with `comment` as the
    container's comment tag (`media.metadata`). `overwrite=False`: FileExistsError rather than replace.

    yuv420p needs even sides, so an odd height or width is padded by repeating
    the last row or column (Lance's outputs are multiples of 16 anyway).
    """
    import imageio_ffmpeg

    frames = np.asarray(frames)
    _check_uint8_rgb(frames, ndim=4, what="a video")
    if not fps > 0:
        raise LanceUsageError(f"the frame rate must be positive, got {fps} (for {path})")
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    height, width = frames.shape[1:3]
    path = Path(path)

    def encode(tmp: Path) -> None:
        writer = imageio_ffmpeg.write_frames(
            str(tmp), (width, height), fps=fps, codec="libx264", pix_fmt_out="yuv420p",
            quality=None, macro_block_size=1, ffmpeg_log_level="error",
            output_params=["-crf", str(VIDEO_CRF), "-movflags", "+faststart"]
            + (["-metadata", f"comment={comment}"] if comment else []),
        )
        writer.send(None)  # start ffmpeg
        try:
            for frame in frames:
                writer.send(np.ascontiguousarray(frame))
        except OSError as exc:
            if exc.errno is None:  # imageio-ffmpeg's wrapper of a broken pipe: ffmpeg died (disk full, ...)
                raise OSError(errno.EPIPE, f"ffmpeg stopped ({_one_line(exc).split(' FFMPEG')[0]})") from exc
            raise
        finally:
            writer.close()  # flushes and waits for ffmpeg (it does not report a failed flush: hence the read-back)

    try:
        publish(path, encode, verify=lambda tmp: _check_mp4(tmp, width, height), what="video", overwrite=overwrite)
    except RuntimeError as exc:
        raise LanceError(f"cannot write video {path}: {_one_line(exc)}") from exc


def _check_mp4(tmp: Path, width: int, height: int) -> None:
    """The file opens with the written size and its first frame decodes."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(tmp), pix_fmt="rgb24")
    try:
        meta = next(reader)
        if tuple(meta["size"]) != (width, height):
            raise ValueError(f"reads back as {meta['size'][0]}x{meta['size'][1]}, not {width}x{height}")
        first = next(reader, None)
        if first is None or len(first) != width * height * 3:
            raise ValueError("its first frame does not decode")
    finally:
        reader.close()


# --------------------------------------------------------------------------- decoded tensors


def to_uint8(decoded: torch.Tensor) -> np.ndarray:
    """Decoded pixels [3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3], as upstream `decode_video_tensor`.

    The same float32 op sequence as upstream: clip to [-1, 1], *0.5 +0.5, *255,
    torch.round (half to even), clamp, cast.
    """
    if decoded.ndim != 4 or decoded.shape[0] != 3:
        raise ValueError(f"expected decoded pixels [3, T, H, W], got {list(decoded.shape)}")
    x = decoded.detach().to("cpu", torch.float32).permute(1, 0, 2, 3)
    x = x.clip(-1, 1).mul(0.5).add(0.5).mul(255).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


# --------------------------------------------------------------------------- helpers


def _check_uint8_rgb(array: np.ndarray, ndim: int, what: str) -> None:
    """Reject anything but uint8 RGB with `ndim` dims and non-empty sides."""
    if array.dtype != np.uint8 or array.ndim != ndim or array.shape[-1] != 3 or 0 in array.shape:
        shape = "[H, W, 3]" if ndim == 3 else "[T, H, W, 3]"
        raise ValueError(f"{what} must be uint8 {shape}, got {array.dtype} {list(array.shape)}")


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line.

    imageio-ffmpeg appends ffmpeg's whole stderr (version banner first) after
    "=== stderr ==="; only its last line says what went wrong.
    """
    head, _, stderr = str(exc).partition("=== stderr ===")
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    text = " ".join(head.split())
    if lines:
        text = f"{text} ({lines[-1]})" if text else lines[-1]
    return text[:300] if text else type(exc).__name__
