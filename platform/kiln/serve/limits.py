"""Request budgets (the ``serve.limits`` section) and the checks that apply them before any work.

Everything a client sizes is checked against a budget before it is allocated, looped over or
decoded: JSON nesting depth and number literals (before the body is parsed), tensor dimensions,
elements and rows (before data is converted), string and bytes lengths, image pixels (read from the
PNG/JPEG header before decoding), records and keys of ``/predict``. A request over a budget is
answered 413 with a message naming the ``serve.limits`` key.
"""

from __future__ import annotations

import io
import json
import re
import warnings
from typing import Any

import numpy as np
from pydantic import Field

from kiln.config import Section
from kiln.errors import KilnError

# Bodies above this are parsed and decoded in a worker thread, not on the replica's event loop:
# health checks and small requests keep being answered while a large one is parsed.
OFFLOAD_BYTES = 64 * 1024
IMAGE_FORMATS = ("PNG", "JPEG")
# A JSON string, escapes included (no nested quantifier: linear time on any input).
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


class LimitError(KilnError):
    """A request over a ``serve.limits`` budget (answered 413)."""

    def __init__(self, message: str, status: int = 413):
        super().__init__(message)
        self.status = status


class LimitsConfig(Section):
    """Per-request budgets of a served model; exceeding one answers 413 naming the key."""

    max_dims: int = Field(8, ge=1, le=32, description="Most dimensions of an input tensor.")
    max_elements: int = Field(
        1 << 24, ge=1, description="Most elements of one input tensor (before converting it)."
    )
    max_rows: int = Field(
        4096, ge=1, description="Most rows (first dimension, images, records) in one request."
    )
    max_batch_rows: int = Field(
        8192,
        ge=1,
        description="Most rows in one model call: a dynamic batch joining more runs in chunks.",
    )
    max_string_bytes: int = Field(
        4 * 1024 * 1024,
        ge=1,
        description="Longest string or BYTES element (a base64 or raw image, a label).",
    )
    max_json_depth: int = Field(32, ge=2, le=1000, description="Deepest JSON nesting of a body.")
    max_number_chars: int = Field(
        64, ge=8, le=4000, description="Longest number literal in a JSON body."
    )
    max_image_pixels: int = Field(
        4096 * 4096,
        ge=1,
        description="Most pixels of one encoded image (PNG/JPEG), read from its header.",
    )
    max_record_keys: int = Field(1024, ge=1, description="Most keys of one /predict record.")


def _key(name: str) -> str:
    return f"serve.limits.{name}"


def over(what: str, value: int, limit: int, key: str) -> LimitError:
    """The error for ``what`` of ``value`` over ``limit`` (``serve.limits.KEY``)."""
    return LimitError(f"{what} {value} is over the limit of {limit} ({_key(key)})")


def _skeleton(body: bytes) -> bytes:
    """The body with every JSON string emptied: what is left are brackets, numbers and literals."""
    return _JSON_STRING.sub(b'""', body)


def check_json_depth(body: bytes, limits: LimitsConfig, skeleton: bytes | None = None) -> None:
    """LimitError when the body nests arrays/objects deeper than ``max_json_depth``; linear time,
    without parsing (a deep body would exhaust the parser's stack)."""
    if body.count(b"[") + body.count(b"{") <= limits.max_json_depth:
        return
    chars = np.frombuffer(_skeleton(body) if skeleton is None else skeleton, dtype=np.uint8)
    steps = (
        (chars == ord("[")).astype(np.int32)
        + (chars == ord("{"))
        - (chars == ord("]"))
        - (chars == ord("}"))
    )
    depth = int(np.cumsum(steps).max(initial=0))
    if depth > limits.max_json_depth:
        raise over("JSON nesting depth", depth, limits.max_json_depth, "max_json_depth")


# The body with every character of a number literal (and the "e" of true/false) as "1", every
# other as " ": a literal longer than the limit is then a run of "1"s, found by a substring search.
_NUMBER_RUNS = bytes(49 if chr(c) in "-+.eE0123456789" else 32 for c in range(256))
# A float literal whose exponent is beyond a double's range (it would parse as Infinity).
_HUGE_EXPONENT = re.compile(rb"[eE]\+?0*(?:[0-9]{4,}|309|3[1-9][0-9]|[4-9][0-9]{2})(?![0-9])")


def parse_json(body: bytes, limits: LimitsConfig) -> Any:
    """``json.loads`` within the budgets, checked on the body before it is parsed (linear scans in
    C, so a large body costs no more than its parse): nesting depth, number literals by length,
    exponents beyond a double's range; the non-finite constants (NaN, Infinity) are refused while
    parsing (strict JSON, as every answer is). Raises LimitError, or ValueError (JSONDecodeError,
    UnicodeDecodeError, a refused number) for text that is not strict JSON."""
    skeleton = _skeleton(body)
    check_json_depth(body, limits, skeleton)
    # Two linear passes in C (a translate, a substring search): a regular expression search retried
    # each position inside a run of digits (1.5 ms of a 56 KB body of 12,288 pixels, a third of
    # its json.loads).
    runs = skeleton.translate(_NUMBER_RUNS)
    start = runs.find(b"1" * (limits.max_number_chars + 1))
    if start >= 0:  # the whole literal: from its start to the end of its run
        end = runs.find(b" ", start)
        raise over(
            "a number literal of length",
            (len(runs) if end < 0 else end) - start,
            limits.max_number_chars,
            "max_number_chars",
        )
    # (an exponent needs an "e" or "E": a body of integer pixels holds none, a C scan)
    if (b"e" in skeleton or b"E" in skeleton) and _HUGE_EXPONENT.search(skeleton):
        raise ValueError("a number is out of the range of a float")

    def constant(text: str) -> Any:
        raise ValueError(f"{text} is not a JSON number (non-finite numbers are refused)")

    return json.loads(body, parse_constant=constant)


def check_shape(shape: list[int], limits: LimitsConfig, where: str) -> int:
    """The element count of ``shape`` (a list of non-negative ints), computed within the budgets:
    dimensions, rows and elements are checked before anything is sized by them."""
    if len(shape) > limits.max_dims:
        raise over(f"{where}: dimensions", len(shape), limits.max_dims, "max_dims")
    if shape and shape[0] > limits.max_rows:
        raise over(f"{where}: rows", shape[0], limits.max_rows, "max_rows")
    count = 1
    for dim in shape:
        count *= dim
        if count > limits.max_elements:
            if 0 in shape:
                return 0
            raise over(f"{where}: elements", count, limits.max_elements, "max_elements")
    return count


def check_rows(rows: int, limits: LimitsConfig, what: str) -> None:
    if rows > limits.max_rows:
        raise over(f"{what}: rows", rows, limits.max_rows, "max_rows")


def check_string(length: int, limits: LimitsConfig, where: str) -> None:
    if length > limits.max_string_bytes:
        raise over(f"{where}: length", length, limits.max_string_bytes, "max_string_bytes")


def check_image(data: bytes, limits: LimitsConfig, where: str) -> None:
    """LimitError unless ``data`` is a PNG or JPEG whose header declares at most
    ``max_image_pixels``; only the header is read (nothing is decoded). 400 for another format."""
    from PIL import Image, UnidentifiedImageError

    check_string(len(data), limits, where)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
                width, height = img.size
    except Image.DecompressionBombError:  # over Pillow's own bound, far above ours
        raise over(
            f"{where}: image pixels", 1 << 31, limits.max_image_pixels, "max_image_pixels"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise LimitError(f"{where} does not decode as an image (send PNG or JPEG)", 400) from None
    if width * height > limits.max_image_pixels:
        raise over(
            f"{where}: image of {width}x{height} pixels:",
            width * height,
            limits.max_image_pixels,
            "max_image_pixels",
        )
