"""Mask files that are damaged (truncated, a flipped data byte, broken metadata) never load silently:
every case is a one-line error naming the file; masks written before checksums still load."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from wagle import WeightMask
from wagle.errors import UserError
from wagle.mask import MaskFileError


def sample_mask() -> WeightMask:
    g = torch.Generator().manual_seed(0)
    return WeightMask.from_dict(
        {
            "a.weight": torch.rand(40, 33, generator=g) < 0.5,
            "b.bias": torch.rand(13, generator=g) < 0.5,
        },
        metadata={"method": "wagle"},
    )


def header_size(raw: bytes) -> int:
    return 8 + struct.unpack("<Q", raw[:8])[0]


def rewrite_metadata(path, change) -> None:
    """Rewrite the file with ``change(metadata)`` applied, keeping the tensors (a tampered header)."""
    raw = path.read_bytes()
    n = header_size(raw)
    header = json.loads(raw[8:n])
    change(header["__metadata__"])
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[n:])


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "mask.safetensors"
    sample_mask().save(path)
    return path


def assert_clear(error, path, words):
    text = str(error.value)
    assert str(path) in text and words in text and "\n" not in text, text
    assert isinstance(error.value, UserError)


def test_round_trip_is_verified_and_bit_identical(saved):
    mask, loaded = sample_mask(), WeightMask.load(saved)
    assert loaded.digest == mask.digest and loaded.metadata == {"method": "wagle"}
    assert all(torch.equal(loaded.packed(n), mask.packed(n)) for n in mask)


def test_a_truncated_mask_file_is_refused(saved):
    raw = saved.read_bytes()
    for size in (len(raw) - 1, header_size(raw) + 3, header_size(raw) - 5, 4):
        saved.write_bytes(raw[:size])
        with pytest.raises(MaskFileError) as error:
            WeightMask.load(saved)
        assert_clear(error, saved, "mask")


@pytest.mark.parametrize("offset", [0, 7, 165, -1])
def test_a_flipped_data_byte_is_refused(saved, offset):
    raw = bytearray(saved.read_bytes())
    position = header_size(bytes(raw)) + offset if offset >= 0 else len(raw) + offset
    raw[position] ^= 0xFF
    saved.write_bytes(bytes(raw))
    with pytest.raises(MaskFileError) as error:
        WeightMask.load(saved)
    assert_clear(error, saved, "damaged mask file")


def test_a_popcount_preserving_swap_is_caught_by_the_checksum(saved):
    raw = bytearray(saved.read_bytes())
    start = header_size(bytes(raw))
    for i in range(start, len(raw)):  # find a byte with bits 0 and 1 different: swapping them keeps the count
        if (raw[i] & 1) != ((raw[i] >> 1) & 1):
            raw[i] ^= 0x03
            break
    saved.write_bytes(bytes(raw))
    with pytest.raises(MaskFileError, match="checksum of") as error:
        WeightMask.load(saved)
    assert_clear(error, saved, "checksum")


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda m: m.update(shapes=m["shapes"][:-3]), "'shapes' is not valid"),
        (lambda m: m.update(shapes=json.dumps({"a.weight": [40, 33], "b.bias": "13"})), "shape of 'b.bias'"),
        (lambda m: m.update(order='["a.weight"]'), "'order' and 'shapes'"),
        (lambda m: m.pop("order"), "'order' is missing"),
        (lambda m: m.update(num_selected="x"), "'num_selected' is not valid"),
        (lambda m: m.update(num_selected=str(int(m["num_selected"]) + 1)), "recorded"),
        (lambda m: m.update(selected=json.dumps({"a.weight": 1, "b.bias": 0})), "recorded"),
        (lambda m: m.update(sha256=m["sha256"].replace('"', "", 1)), "'sha256' is not valid"),
        (lambda m: m.update(digest="0" * 64), "digest"),
        (lambda m: m.update(shapes=json.dumps({"a.weight": [33, 40], "b.bias": [13]})), "fingerprint"),
        (lambda m: m.update(shapes=json.dumps({"a.weight": [41, 33], "b.bias": [13]})), "bytes do not hold"),
        (lambda m: m.update(format_version="9"), "newer wagle"),
        (lambda m: m.update(format="other"), "not a wagle mask"),
    ],
)
def test_damaged_metadata_is_refused_naming_the_file(saved, change, words):
    rewrite_metadata(saved, change)
    with pytest.raises(MaskFileError) as error:
        WeightMask.load(saved)
    assert_clear(error, saved, words)


def test_a_damaged_header_byte_is_refused(saved):
    raw = bytearray(saved.read_bytes())
    raw[9] = ord("#")  # inside the JSON header
    saved.write_bytes(bytes(raw))
    with pytest.raises(MaskFileError) as error:
        WeightMask.load(saved)
    assert_clear(error, saved, "not a safetensors mask file")


def test_a_directory_or_a_missing_path_is_named_as_such(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory, not a mask file") as error:
        WeightMask.load(tmp_path)
    assert error.value.filename == str(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        WeightMask.load(tmp_path / "missing.safetensors")


def write_format_1(mask: WeightMask, path) -> None:
    """A file as the writer without checksums (format 1) wrote it."""
    save_file(
        {n: mask.packed(n).clone() for n in mask},
        str(path),
        metadata={
            "method": "wagle",
            "format": "wagle-mask",
            "format_version": "1",
            "shapes": json.dumps({n: list(mask.shape(n)) for n in mask}),
            "order": json.dumps(mask.names),
            "fingerprint": mask.fingerprint,
            "num_selected": str(mask.num_selected),
            "numel": str(mask.numel),
        },
    )


def test_format_1_masks_load_and_their_counts_are_verified(tmp_path):
    mask, path = sample_mask(), tmp_path / "old.safetensors"
    write_format_1(mask, path)
    loaded = WeightMask.load(path)
    assert loaded.digest == mask.digest and loaded.metadata == {"method": "wagle"}
    raw = bytearray(path.read_bytes())
    start = header_size(bytes(raw))
    raw[start] ^= 0x01  # one bit: the selected count changes
    path.write_bytes(bytes(raw))
    with pytest.raises(MaskFileError, match="selected weights, recorded") as error:
        WeightMask.load(path)
    assert_clear(error, path, "damaged")
