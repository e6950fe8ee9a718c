"""Images of a dataset being built: validated, identified by content, stored once.

An image's identity is the sha256 of its decoded RGB pixels and size (``pixel_hash``): what the
model sees, whatever the container. Two files with the same pixels are one image, so the splits
can keep every image in one split only, and the check finds a leak even through a re-saved copy.

Images are streamed: each one is read, decoded (which is the validation: a truncated or corrupt
file fails here, naming the source entry), hashed and written to a staging folder under its
hash, then dropped; nothing keeps more than one image in memory.
"""
from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from lmms_sgm.data import strict_decoding
from lmms_sgm.datasets.records import DatasetError, ImageInput

EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}
NAME_CHARS = 16  # hex characters of the hash in a file name (64 bits)


def pixel_hash(image: Image.Image) -> str:
    """sha256 of the RGB pixels and the size."""
    rgb = image.convert("RGB")
    h = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()


def decode(data: bytes, what: str) -> Image.Image:
    """The fully decoded image, or a DatasetError that says ``what`` cannot be decoded and why.

    Truncated files are refused even when ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is on, as
    importing ``lmms_eval.api.task`` sets it for the whole process (PIL then pads them with grey).
    """
    try:
        with strict_decoding():
            image = Image.open(io.BytesIO(data))
            image.load()  # decodes every pixel: truncated files fail here, not at profiling time
        return image
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds (UnidentifiedImageError, OSError, SyntaxError...)
        raise DatasetError(f"{what} cannot be decoded as an image ({type(e).__name__}: {e})") from None


def read_bytes(image: ImageInput) -> bytes:
    if image.data is not None:
        return image.data
    if image.path is None:
        raise DatasetError(f"{image.where}: no image")
    try:
        return image.path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"{image.where}: image file {image.path} not found") from None
    except OSError as e:
        raise DatasetError(f"{image.where}: image file {image.path} cannot be read ({e})") from None


@dataclass(frozen=True)
class StoredImage:
    hash: str
    name: str  # "<hash[:16]><ext>"
    width: int
    height: int


class ImageStore:
    """A content-addressed folder of validated images (the build's staging area)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._known: dict[str, StoredImage] = {}

    def __len__(self) -> int:
        return len(self._known)

    def add(self, source: ImageInput) -> StoredImage:
        """Validate, hash and store one source image (a file or bytes); returns its identity."""
        data = read_bytes(source)
        what = f"{source.where}: image {source.describe()}"
        image = decode(data, what)
        fmt = image.format or ""
        h = pixel_hash(image)
        stored = self._known.get(h)
        if stored is None:
            if fmt in EXTENSIONS:  # keep the source's own bytes: no re-encoding loss
                ext, payload = EXTENSIONS[fmt], data
            else:  # an exotic container: store a lossless PNG of the same pixels
                buf = io.BytesIO()
                image.convert("RGB").save(buf, format="PNG")
                ext, payload = ".png", buf.getvalue()
            stored = StoredImage(h, h[:NAME_CHARS] + ext, image.width, image.height)
            (self.folder / stored.name).write_bytes(payload)
            self._known[h] = stored
        image.close()
        return stored

    def add_rendered(self, image: Image.Image, photo: bool) -> StoredImage:
        """Store an image drawn by the builder (an attack variant).

        ``photo``: it contains a photo (SD+TYPO style), stored as JPEG quality 95 as MM-SafetyBench
        stores its own (a lossless PNG of a 512-px photo weighs ~10x more and takes ~5x longer to
        write); text-only drawings are stored as PNG. The identity is the pixels of what is stored.
        """
        buf = io.BytesIO()
        if photo:
            image.convert("RGB").save(buf, format="JPEG", quality=95)
            with Image.open(io.BytesIO(buf.getvalue())) as stored_pixels:
                h = pixel_hash(stored_pixels)
        else:
            image.convert("RGB").save(buf, format="PNG", compress_level=1)  # flat colour: level 1 is enough
            h = pixel_hash(image)
        stored = self._known.get(h)
        if stored is None:
            stored = StoredImage(h, h[:NAME_CHARS] + (".jpg" if photo else ".png"), image.width, image.height)
            (self.folder / stored.name).write_bytes(buf.getvalue())
            self._known[h] = stored
        return stored

    def get(self, h: str) -> StoredImage:
        return self._known[h]

    def path(self, stored: StoredImage) -> Path:
        return self.folder / stored.name

    def open(self, stored: StoredImage) -> Image.Image:
        with Image.open(self.path(stored)) as f:
            return f.convert("RGB")


def relative_name(stored: StoredImage) -> str:
    """Where an image lives inside a split folder: ``images/<2 hex>/<name>`` (no folder holds
    more than ~1/256 of the images, which file systems and the Hub's uploader prefer)."""
    return f"images/{stored.hash[:2]}/{stored.name}"


def place(src: Path, dest: Path) -> None:
    """Move a staged image into its split folder (a rename: same file system, no copy)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dest)
