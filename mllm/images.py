"""Image loading and the coordinate frame: how the model's normalised 0-1 box coordinates map to pixels.

LLaVA-1.5 was trained on images padded to a square with the CLIP mean colour (``padded``), and a
box's fractions are then of that square. ``original`` squashes the image to a square, so fractions
are of the image itself; ``cropped`` leaves the processor's resize + centre crop (llava-hf's default),
which cuts off the sides of non-square images. This module is the one place that knows the mapping.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Union

from PIL import Image, UnidentifiedImageError

from mllm.errors import ImageLoadError

FrameKind = Literal["padded", "original", "cropped"]
FRAME_KINDS: tuple[str, ...] = ("padded", "original", "cropped")
ImageInput = Union[Image.Image, str, Path, bytes]


def load_image(source: ImageInput) -> Image.Image:
    """Open an image as RGB from a PIL image, a path, or encoded bytes; raise `ImageLoadError` if unreadable."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        if isinstance(source, bytes):
            image = Image.open(io.BytesIO(source))
        else:
            path = Path(source)
            if not path.is_file():
                raise ImageLoadError(f"image file not found: {path}")
            image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        if isinstance(error, ImageLoadError):
            raise
        raise ImageLoadError(f"cannot decode image {name}: {error}") from error
    return image.convert("RGB")


@dataclass(frozen=True)
class ImageFrame:
    """Maps normalised model coordinates (u, v in 0-1) to pixels: x = u * scale_x + offset_x.

    `input_size` is (width, height) of the image the model saw after its processor resized it (None
    when unknown); pixels of that image are fractions of this frame (`input_pixels_to_pixels`).
    """

    kind: FrameKind
    width: int
    height: int
    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float
    input_size: tuple[int, int] | None = None

    @classmethod
    def for_image(cls, kind: FrameKind, width: int, height: int) -> ImageFrame:
        if kind == "padded":
            side = max(width, height)
            # Same integer paste offsets as LLaVA's expand2square.
            return cls(kind, width, height, side, side, -((side - width) // 2), -((side - height) // 2))
        if kind == "original":
            return cls(kind, width, height, width, height, 0.0, 0.0)
        if kind == "cropped":
            side = min(width, height)
            return cls(kind, width, height, side, side, (width - side) / 2, (height - side) / 2)
        raise ValueError(f"unknown coordinate frame {kind!r}; choose one of {FRAME_KINDS}")

    def to_pixels(self, box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        """Normalised [x1, y1, x2, y2] in this frame -> pixel [x1, y1, x2, y2] in the original image."""
        x1, y1, x2, y2 = box
        return (x1 * self.scale_x + self.offset_x, y1 * self.scale_y + self.offset_y,
                x2 * self.scale_x + self.offset_x, y2 * self.scale_y + self.offset_y)

    def input_pixels_to_pixels(self, box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        """Pixel [x1, y1, x2, y2] in the model's resized input (`input_size`) -> pixels in the original image."""
        if self.input_size is None:
            raise ValueError("pixels of the model's input (box format 'input_pixels') need the size of the image "
                             "the model saw, and this frame has no input_size")
        width, height = self.input_size
        x1, y1, x2, y2 = box
        return self.to_pixels((x1 / width, y1 / height, x2 / width, y2 / height))

    def to_normalized(self, box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        """Pixel [x1, y1, x2, y2] in the original image -> normalised [x1, y1, x2, y2] in this frame."""
        x1, y1, x2, y2 = box
        return ((x1 - self.offset_x) / self.scale_x, (y1 - self.offset_y) / self.scale_y,
                (x2 - self.offset_x) / self.scale_x, (y2 - self.offset_y) / self.scale_y)


def at_own_aspect(
    images: Sequence[Image.Image], frame: FrameKind, background: tuple[int, int, int], model_type: str
) -> tuple[list[Image.Image], list[ImageFrame]]:
    """What a model that keeps each image's aspect ratio (Qwen2-VL, LLaVA-NeXT) is shown under `frame`: the image as
    given (`original`), or padded to the square of its longer side and never resized (`padded`): its processor
    sizes it."""
    if frame not in ("original", "padded"):
        raise ValueError(f"coordinate frame {frame!r} does not apply to {model_type}, which keeps each image's aspect "
                         "ratio: choose 'original' or 'padded'")
    shown, frames = [], []
    for image in images:
        if frame == "padded":
            square, image_frame = to_model_square(image, "padded", max(image.size), background)
        else:
            square, image_frame = image, ImageFrame.for_image("original", image.width, image.height)
        shown.append(square)
        frames.append(image_frame)
    return shown, frames


def to_model_square(
    image: Image.Image, kind: FrameKind, side: int, background: tuple[int, int, int]
) -> tuple[Image.Image, ImageFrame]:
    """Turn `image` into what the processor should see under frame `kind`, and return its frame."""
    frame = ImageFrame.for_image(kind, image.width, image.height)
    if kind == "padded" and image.width != image.height:
        square = Image.new("RGB", (max(image.size),) * 2, background)
        square.paste(image, (-int(frame.offset_x), -int(frame.offset_y)))
        return square, frame
    if kind == "original" and image.size != (side, side):
        return image.resize((side, side), Image.Resampling.BICUBIC), frame
    return image, frame
