"""A Prepare request: every option, its type and its allowed values, declared once.

The REST API's body (``POST /ti/v1/prepare``) and the Prepare view's form are derived from
:class:`PrepareRequest`; the tagger's options are :class:`~lib_ti.prepare.tagger.TaggerArgs`'s.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

from lib_ti.errors import TIError, short_repr
from lib_ti.prepare.crop import CropMode
from lib_ti.prepare.dedupe import THRESHOLD
from lib_ti.prepare.sources import MIN_SIZE, parse_color
from lib_ti.prepare.tagger import TaggerArgs
from lib_ti.training.options import MAXIMUM as TRAIN_MAXIMUM
from lib_ti.training.options import check_bounds, check_types, coerce_as, path_problem

#: what becomes of a caption the picture already has (a ``.txt`` beside it in the source folder)
CaptionMode = Literal["append", "overwrite", "keep"]
ImageFormat = Literal["png", "jpg", "webp"]
#: the captioner that needs no host: SmilingWolf's WD v3 taggers (ONNX)
WD_TAGGER = "wd14"
NO_CAPTIONER = "none"
_TAGGER = TaggerArgs()


@dataclass(frozen=True)
class PrepareRequest:
    """One Prepare run as the tab and the REST API ask for it."""

    #: the folder of raw pictures (never modified)
    source_dir: str
    #: the training folder to write: new or empty, unless ``overwrite``
    output_dir: str
    #: write into a folder that holds files (same names are replaced)
    overwrite: bool = False
    #: bucket area = resolution²; 0: the loaded model's (SD1 512, SD2 768, SDXL 1024)
    resolution: int = 0
    #: aspect-ratio buckets as the trainer makes them; off: squares
    buckets: bool = True
    crop: CropMode = "focal"
    #: where transparency is flattened and what a kept-whole picture is padded with
    background: str = "#ffffff"
    #: tiles: how much neighbouring tiles overlap (share of a tile's side)
    tile_overlap: float = 0.25
    #: also write a mirrored copy of every image
    flip_copies: bool = False
    #: the host's upscaler for pictures smaller than their bucket ("": Lanczos)
    upscaler: str = ""
    #: pictures whose smaller side is below this are skipped
    min_size: int = MIN_SIZE
    #: look for near-duplicates (perceptual hash) and report them
    dedupe: bool = True
    #: bits (of 64) two hashes may differ in for duplicates
    dedupe_threshold: int = THRESHOLD
    #: copy duplicates too (they are only reported)
    keep_duplicates: bool = False
    image_format: ImageFormat = "png"
    #: "none", "wd14" or one of the host's interrogators ("blip", "deepbooru")
    captioner: str = NO_CAPTIONER
    #: put first in every caption: a trigger such as ``[name]`` (the embedding's name in training) or text
    caption_prefix: str = ""
    caption_mode: CaptionMode = "append"
    tagger_model: str = _TAGGER.model
    general_threshold: float = _TAGGER.general_threshold
    character_threshold: float = _TAGGER.character_threshold
    #: tags never written (comma-separated)
    drop_tags: str = _TAGGER.drop_tags
    underscores_to_spaces: bool = _TAGGER.underscores_to_spaces
    escape_brackets: bool = _TAGGER.escape_brackets
    #: the most tags per caption (0: all above the thresholds)
    max_tags: int = _TAGGER.max_tags
    include_rating: bool = _TAGGER.include_rating

    def tagger_args(self) -> TaggerArgs:
        """The tagger's options of this request."""
        names = {f.name for f in fields(TaggerArgs)}
        values = {name: getattr(self, name) for name in names if name != "model"}
        return TaggerArgs(model=self.tagger_model, **values)


REQUIRED = ("source_dir", "output_dir")
FIELD_TYPES: dict[str, Any] = typing.get_type_hints(PrepareRequest)
MINIMUM: dict[str, float] = {"resolution": 0, "min_size": 1, "dedupe_threshold": 0, "max_tags": 0}
MAXIMUM: dict[str, float] = {
    "resolution": TRAIN_MAXIMUM["resolution"],
    "min_size": 4096,
    "dedupe_threshold": 32,
}
_UNIT = ("tile_overlap", "general_threshold", "character_threshold")


def prepare_request(given: Mapping[str, Any]) -> PrepareRequest:
    """A checked request from the values given (the rest: the defaults); TIError naming a bad field."""
    unknown = [k for k in given if k not in FIELD_TYPES]
    if unknown:
        msg = f"unknown prepare option {short_repr(unknown[0])}; the options are: {', '.join(FIELD_TYPES)}"
        raise TIError(msg)
    missing = [k for k in REQUIRED if not str(given.get(k) or "").strip()]
    if missing:
        msg = f"{missing[0]} is needed: the folder of {'raw pictures' if missing[0] == 'source_dir' else 'the training set to write'}"
        raise TIError(msg)
    req = PrepareRequest(**{k: coerce_as(k, FIELD_TYPES[k], v) for k, v in given.items()})
    check(req)
    return req


def check(req: PrepareRequest) -> None:
    """Types, sets and bounds of every field; TIError naming the field."""
    check_types(req, FIELD_TYPES)
    check_bounds(req, MINIMUM, MAXIMUM)
    for name in _UNIT:
        value = getattr(req, name)
        top = 0.9 if name == "tile_overlap" else 1.0
        if not 0.0 <= value <= top:
            msg = f"{name} must be between 0 and {top} (got {short_repr(value)})"
            raise TIError(msg)
    if req.resolution and (req.resolution < 64 or req.resolution % 8):
        msg = f"resolution must be 0 (the loaded model's) or a multiple of 8 of at least 64 (got {req.resolution})"
        raise TIError(msg)
    for name in REQUIRED:
        problem = path_problem(getattr(req, name))
        if problem:
            msg = f"{name} {problem}"
            raise TIError(msg)
    parse_color(req.background)


def with_resolution(req: PrepareRequest, resolution: int) -> PrepareRequest:
    """``req`` with its resolution decided (0 means the loaded model's)."""
    return replace(req, resolution=req.resolution or resolution)
