"""Photo-like JPEGs for the benchmarks: camera sizes, textures and file sizes, reproducible from a seed."""

from __future__ import annotations

import os
import random
from pathlib import Path

# Photo sizes from a thumbnail to a 2-megapixel camera frame, landscape, portrait and square.
_PHOTO_SIZES = (
    (320, 240), (480, 640), (640, 480), (800, 600), (1024, 768), (768, 1024), (1280, 720),
    (720, 1280), (1080, 1080), (1200, 800), (1600, 900), (1600, 1200), (1200, 1600),
)  # fmt: skip


def make_photos(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` photo-like JPEGs of varied sizes and aspect ratios, 1.4 to 2.7 bits per pixel as camera JPEGs are.

    Smooth colour fields, blurred shapes, mid-frequency texture and sensor noise, saved at
    quality 88: decode cost and file sizes close to real photos, unlike flat synthetic shapes.
    The same arguments give the same files; a finished folder is reused.
    """
    marker = folder / ".complete"
    paths = [folder / f"photo-{i:05d}.jpg" for i in range(count)]
    if marker.exists():
        return paths
    from concurrent.futures import ThreadPoolExecutor

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    seeds = [rng.randrange(2**32) for _ in paths]  # drawn up front: images come out the same in any order

    def save(i: int) -> None:
        _photo(random.Random(seeds[i])).save(paths[i], "JPEG", quality=88)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # Pillow and numpy release the GIL
        list(pool.map(save, range(count)))
    marker.touch()
    return paths


def _photo(rng: random.Random):
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    width, height = rng.choice(_PHOTO_SIZES)
    noise = np.random.default_rng(rng.randrange(2**32))
    coarse = noise.integers(0, 256, (max(2, height // 80), max(2, width // 80), 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(3, 10)):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        box = [x0, y0, x0 + rng.randint(width // 10, width // 2), y0 + rng.randint(height // 10, height // 2)]
        rng.choice([draw.rectangle, draw.ellipse])(box, fill=tuple(rng.randrange(256) for _ in range(3)))
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(1.5)), dtype=np.int16)
    texture = noise.integers(0, 256, (max(1, height // 4), max(1, width // 4)), dtype=np.uint8)
    texture = np.asarray(Image.fromarray(texture).resize((width, height), Image.Resampling.BILINEAR), dtype=np.int16)
    # Busy or smooth scenes, clean or grainy sensors: about 1.4 to 2.7 bits per pixel once compressed.
    pixels += (texture[..., None] - 128) // rng.choice((3, 4, 6))
    grain = rng.choice((4, 7, 10, 14))
    pixels += noise.integers(-grain, grain + 1, pixels.shape, dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
