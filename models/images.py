"""Image conversions at the engine's edges: PNG bytes out, init images in."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from models.errors import InvalidRequest

MAX_INPUT_PIXELS = 4096 * 4096


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """A decoder's NCHW output in [-1, 1] to NHWC uint8 arrays."""
    return ((img / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()


def to_png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def open_image(data: Any) -> Image.Image:
    """Accept a PIL image, an HxWx3 uint8 array, PNG/JPEG bytes, or base64 text (data URLs too)."""
    if isinstance(data, Image.Image):
        return data.convert("RGB")
    if isinstance(data, np.ndarray):
        return Image.fromarray(data.astype(np.uint8), mode="RGB")
    if isinstance(data, str):
        if data.startswith("data:"):
            data = data.partition(",")[2]
        try:
            data = base64.b64decode(data, validate=True)
        except ValueError as e:
            raise InvalidRequest(f"init_image is not valid base64: {e}", param="init_image") from e
    if isinstance(data, (bytes, bytearray)):
        try:
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > MAX_INPUT_PIXELS:
                raise InvalidRequest(f"init_image is {img.width}x{img.height}, larger than allowed.", param="init_image")
            return img.convert("RGB")
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
            raise InvalidRequest(f"init_image could not be decoded as an image: {e}", param="init_image") from e
    raise InvalidRequest(f"init_image of type {type(data).__name__} is not supported.", param="init_image")


def to_model_input(data: Any, width: int, height: int) -> torch.Tensor:
    """(1, 3, H, W) float tensor in [-1, 1], resized to the requested size."""
    img = open_image(data)
    if img.size != (width, height):
        img = img.resize((width, height), Image.Resampling.LANCZOS)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)
    return x.permute(2, 0, 1).unsqueeze(0)
