"""Image loading and the coordinate frame (`mllm.images`), alone and through `encode`."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from conftest import random_image
from PIL import Image

import mllm
from mllm.images import FRAME_KINDS, ImageFrame, load_image, to_model_square


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_load_image_from_pil_path_and_bytes(tmp_path):
    image = random_image(0, 12, 20)
    path = tmp_path / "image.png"
    image.save(path)
    for source in (image, path, str(path), _png_bytes(image)):
        loaded = load_image(source)
        assert loaded.mode == "RGB"
        assert loaded.size == (20, 12)
        assert np.array_equal(np.asarray(loaded), np.asarray(image))


def test_load_image_converts_to_rgb():
    grey = Image.new("L", (5, 3), 200)
    assert load_image(grey).mode == "RGB"
    assert load_image(grey).getpixel((0, 0)) == (200, 200, 200)


def test_load_image_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "missing.png"
    with pytest.raises(mllm.ImageLoadError, match="not found") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_load_image_garbage_file(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"not an image")
    with pytest.raises(mllm.ImageLoadError, match="cannot decode") as info:
        load_image(path)
    assert "broken.jpg" in str(info.value)


def test_load_image_garbage_bytes():
    with pytest.raises(mllm.ImageLoadError, match="<bytes>"):
        load_image(b"not an image")


@pytest.mark.parametrize("kind", FRAME_KINDS)
@pytest.mark.parametrize(("width", "height"), [(40, 20), (20, 40), (33, 33), (41, 20)])
def test_frame_round_trip(kind, width, height):
    frame = ImageFrame.for_image(kind, width, height)
    for box in [(0.0, 0.0, 1.0, 1.0), (0.1, 0.25, 0.6, 0.9), (0.5, 0.5, 0.5, 0.5)]:
        assert frame.to_normalized(frame.to_pixels(box)) == pytest.approx(box)
    pixels = (3.0, 1.5, 17.0, 19.0)
    assert frame.to_pixels(frame.to_normalized(pixels)) == pytest.approx(pixels)


def test_frame_hand_computed():
    padded = ImageFrame.for_image("padded", 40, 20)
    assert (padded.scale_x, padded.scale_y, padded.offset_x, padded.offset_y) == (40, 40, 0, -10)
    assert padded.to_pixels((0.0, 0.25, 1.0, 0.75)) == pytest.approx((0, 0, 40, 20))
    assert padded.to_pixels((0.0, 0.0, 1.0, 1.0)) == pytest.approx((0, -10, 40, 30))
    assert padded.to_normalized((10, 5, 20, 15)) == pytest.approx((0.25, 0.375, 0.5, 0.625))
    tall = ImageFrame.for_image("padded", 20, 40)
    assert tall.to_pixels((0.25, 0.0, 0.75, 1.0)) == pytest.approx((0, 0, 20, 40))
    original = ImageFrame.for_image("original", 40, 20)
    assert original.to_pixels((0.5, 0.5, 1.0, 1.0)) == pytest.approx((20, 10, 40, 20))
    cropped = ImageFrame.for_image("cropped", 40, 20)
    assert cropped.to_pixels((0.0, 0.0, 1.0, 1.0)) == pytest.approx((10, 0, 30, 20))


def test_frame_unknown_kind():
    with pytest.raises(ValueError, match="unknown coordinate frame 'stretched'"):
        ImageFrame.for_image("stretched", 10, 10)  # type: ignore[arg-type]


@pytest.mark.parametrize(("width", "height"), [(40, 20), (20, 40), (41, 20), (20, 27)])
def test_to_model_square_padded(width, height):
    colour, background = (250, 10, 20), (1, 2, 3)
    image = Image.new("RGB", (width, height), colour)
    square, frame = to_model_square(image, "padded", 32, background)
    side = max(width, height)
    assert square.size == (side, side)
    assert frame.kind == "padded"
    pixels = np.asarray(square)
    is_image = (pixels == colour).all(axis=-1)
    assert ((pixels == background).all(axis=-1) | is_image).all()
    assert is_image.sum() == width * height
    assert (~is_image).sum() == side * side - width * height > 0
    # Where the image sits in the square, as fractions of the square, is the frame's normalised box of the image.
    rows, cols = np.nonzero(is_image)
    pasted = (cols.min() / side, rows.min() / side, (cols.max() + 1) / side, (rows.max() + 1) / side)
    assert frame.to_normalized((0, 0, width, height)) == pytest.approx(pasted)
    # The square's full extent is [0, 1] in the frame, i.e. one side-long box in original pixels.
    x1, y1, x2, y2 = frame.to_pixels((0.0, 0.0, 1.0, 1.0))
    assert (x2 - x1, y2 - y1) == (side, side)


def test_to_model_square_padded_keeps_content_aligned():
    image = random_image(3, 20, 41)
    square, frame = to_model_square(image, "padded", 32, (0, 0, 0))
    for x, y in [(0, 0), (40, 19), (17, 8)]:
        assert square.getpixel((x - int(frame.offset_x), y - int(frame.offset_y))) == image.getpixel((x, y))


def test_to_model_square_square_image_is_untouched():
    image = random_image(1, 30, 30)
    square, frame = to_model_square(image, "padded", 32, (0, 0, 0))
    assert square is image
    assert frame.to_pixels((0.0, 0.0, 1.0, 1.0)) == pytest.approx((0, 0, 30, 30))


@pytest.mark.parametrize(("width", "height"), [(40, 20), (20, 40), (32, 32)])
def test_to_model_square_original(width, height):
    square, frame = to_model_square(random_image(2, height, width), "original", 32, (0, 0, 0))
    assert square.size == (32, 32)
    assert frame.kind == "original"
    assert frame.to_normalized((0, 0, width, height)) == pytest.approx((0, 0, 1, 1))
    assert frame.to_pixels((0.0, 0.0, 1.0, 1.0)) == pytest.approx((0, 0, width, height))


def test_to_model_square_cropped_leaves_image_to_processor():
    image = random_image(4, 20, 40)
    square, frame = to_model_square(image, "cropped", 32, (0, 0, 0))
    assert square is image
    assert frame.to_pixels((0.0, 0.0, 1.0, 1.0)) == pytest.approx((10, 0, 30, 20))


@pytest.mark.parametrize("kind", FRAME_KINDS)
def test_encode_frame(tiny_model, kind):
    image = random_image(5, 20, 40)
    encoding = tiny_model.encode([image], ["hi"], frame=kind)
    assert encoding.frames[0].kind == kind
    assert encoding.frames[0] == dataclasses.replace(ImageFrame.for_image(kind, 40, 20), input_size=(32, 32))
    assert encoding.pixel_values.shape[-2:] == (32, 32)  # the square the tower saw: the frame's input_size


def test_encode_frames_differ_in_pixels(tiny_model):
    image = random_image(6, 16, 40)
    pixels = {kind: tiny_model.encode([image], ["hi"], frame=kind).pixel_values for kind in FRAME_KINDS}
    assert not np.allclose(pixels["padded"].numpy(), pixels["original"].numpy())
    assert not np.allclose(pixels["padded"].numpy(), pixels["cropped"].numpy())


def test_encode_padded_band_is_clip_mean(tiny_model):
    # The padded band is the CLIP mean colour, so it normalises to (nearly) zero.
    image = Image.new("RGB", (32, 16), (255, 255, 255))
    pixel_values = tiny_model.encode([image], ["hi"], frame="padded").pixel_values[0]
    assert pixel_values[:, :4].abs().max() < 0.02
    assert pixel_values[:, 12:20].min() > 1.0


def test_encode_unknown_frame(tiny_model, images):
    with pytest.raises(ValueError, match="unknown coordinate frame 'square'"):
        tiny_model.encode(images[:1], ["hi"], frame="square")
