"""AnyRes multi-crop images: a base view of the whole image plus a grid of sub-crops at a resolution chosen from a
list of candidate grids ("pinpoints"), every crop at the encoder's own input size."""

from __future__ import annotations

from PIL import Image

# Candidate grids in crop units (columns, rows), as LLaVA-NeXT/ProxyV fine-tuning uses them: at most 4 sub-crops.
DEFAULT_GRIDS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))


def default_pinpoints(crop_size: int) -> list[list[int]]:
    return [[cols * crop_size, rows * crop_size] for cols, rows in DEFAULT_GRIDS]


def usable_pinpoints(pinpoints, crop_size: int, max_crops: int) -> list[tuple[int, int]]:
    """Pinpoints (width, height) whose sub-crops plus the base view fit in `max_crops`."""
    usable = []
    for width, height in pinpoints:
        if width % crop_size or height % crop_size:
            raise ValueError(f"Pinpoint {width}x{height} is not a multiple of the crop size {crop_size}.")
        if (width // crop_size) * (height // crop_size) + 1 <= max_crops:
            usable.append((width, height))
    return usable


def best_resolution(image_size: tuple[int, int], pinpoints) -> tuple[int, int]:
    """The pinpoint that keeps the most of the image's own pixels once it is scaled to fit; ties go to the one that
    wastes the least canvas."""
    width, height = image_size
    best, best_key = None, None
    for cand_w, cand_h in pinpoints:
        scale = min(cand_w / width, cand_h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        key = (kept, -(cand_w * cand_h - kept))
        if best_key is None or key > best_key:
            best, best_key = (cand_w, cand_h), key
    return best


def split_into_crops(image: Image.Image, pinpoints, crop_size: int) -> list[Image.Image]:
    """[base view, sub-crops in raster order]. The image is scaled to fit the chosen grid, centred on a black
    canvas, and cut into crop_size squares; the base view is the whole image resized to one crop."""
    image = image.convert("RGB")
    width, height = best_resolution(image.size, pinpoints)
    scale = min(width / image.width, height / image.height)
    fitted = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BICUBIC)
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    canvas.paste(fitted, ((width - fitted.width) // 2, (height - fitted.height) // 2))
    crops = [image.resize((crop_size, crop_size), Image.BICUBIC)]
    for top in range(0, height, crop_size):
        for left in range(0, width, crop_size):
            crops.append(canvas.crop((left, top, left + crop_size, top + crop_size)))
    return crops
