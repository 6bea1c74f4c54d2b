"""Every input a user types or hands over, swept by generated cases: success, or one error line and exit code 2.

The property, for `--set` values, config files, field folders, precomputed weights, photos and image folders:
the command ends with exit code 0 or 2, never a traceback; an error is one line on stderr that names the file or
the key; and the output folder holds complete files or nothing (no temporary or half-written file).
The `ci` hypothesis profile (tests/conftest.py) runs a fixed set of cases; HYPOTHESIS_PROFILE=deep many more.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
import shutil
import struct
import tempfile
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import event, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from hyperfields.cli.main import app
from hyperfields.config import Config, load_config
from hyperfields.data import IMAGE_SUFFIXES, METADATA_NAME, ImageRecord, scan_image_folder
from hyperfields.errors import UserError, printable
from hyperfields.field.io import load_field
from hyperfields.field.record import REQUIRED_RECORD
from hyperfields.precompute import INDEX_NAME, THETA0_PREFIX, WEIGHTS_NAME, load_precomputed, write_precomputed
from hyperfields.predict import read_photo
from tests.conftest import QuadraticTask, clean_exit
from tests.tiny_field import ROOT, TinyField, tiny_field

runner = CliRunner()
CI = settings.default.max_examples
# A CLI case that loads a field and predicts costs about a second on a CPU: those sweeps run a quarter as many.
FEW = max(5, CI // 4)

SECTIONS = [f.name for f in dataclasses.fields(Config)]
KEYS = [f"{section}.{f.name}" for section in SECTIONS for f in dataclasses.fields(getattr(Config(), section))]

# ------------------------------------------------------------------------------------------------ strategies

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=2**63 - 2), st.floats(), st.text(max_size=20)
)
documents = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8) | st.integers(), inner, max_size=3),
    max_leaves=10,
)
# Values that broke or nearly broke a parser: invalid escapes, nesting deeper than the stack, integers of thousands of
# digits, impossible dates, aliases (recursive ones too), Python tags, control characters.
TRICKY_VALUES = [
    '["re:(time|add)_embedding\\.linear_\\d"]',
    "[" * 1100,
    "{a: " * 1100,
    "1" * 5000,
    "2020-13-45",
    ".nan",
    "-.inf",
    "1e999",
    "&a [*a]",
    "!!python/object/apply:os.system ['true']",
    "!!binary aGk=",
    "~",
    "0x1F",
    "1e3",
    "1_000",
    "'unclosed",
    "{a: 1",
    "- a\n- b",
    "\x00",
    "\t",
    "\u2028",
    "é日本",
    "yes",
    "null",
    "[]",
    "{}",
    "? a",
    "%YAML 1.2",
    "--- a\n--- b",
    "@reserved",
    "`tick",
    "*unknown",
]
set_values = st.one_of(
    st.text(max_size=40),
    documents.map(lambda value: yaml.safe_dump(value, default_flow_style=True, allow_unicode=True).strip()),
    st.sampled_from(TRICKY_VALUES),
    st.integers(1_000, 100_000).map(lambda n: "x" * n),
    st.tuples(st.sampled_from("\"'[{&*!|>%@`"), st.text(max_size=20)).map("".join),
)
set_keys = st.one_of(
    st.sampled_from(KEYS),
    st.text(max_size=30).filter(lambda key: "=" not in key),
    st.sampled_from(SECTIONS).map(lambda section: f"{section}.nope"),
)

TRICKY_FILES = [
    "",
    "# only a comment\n",
    "---\n---\n",
    "\ufefftrain:\n  max_steps: 3\n",
    "a: &x {b: 1}\nc: *x\n",
    "&a [*a]\n",
    "train: &t {max_steps: 5}\nmodel: *t\n",
    "train:\n  max_steps: !!float 5\n",
    "train: [1, 2]\n",
    "train:\n  - max_steps\n",
    "0\n",
    "false\n",
    "train: {max_steps: 1",
    'lora:\n  targets: "a\\.b"\n',
    "[" * 1100,
    "model:\n  resolution: " + "9" * 5000,
    "train:\n\tmax_steps: 3\n",
    "train:\n  seed: 2020-13-45\n",
    "!!python/name:os.system\n",
]
config_files = st.one_of(
    st.binary(max_size=512),
    documents.map(lambda value: yaml.safe_dump(value, allow_unicode=True).encode()),
    st.dictionaries(
        st.sampled_from([*SECTIONS, "nope"]),
        st.one_of(
            st.dictionaries(
                st.sampled_from([key.split(".")[1] for key in KEYS]) | st.text(max_size=8), documents, max_size=4
            ),
            documents,
        ),
        max_size=4,
    ).map(lambda value: yaml.safe_dump(value, allow_unicode=True).encode()),
    st.sampled_from(TRICKY_FILES).map(str.encode),
)


def png_header(width: int, height: int, data: bytes = b"") -> bytes:
    """A PNG whose header claims width x height pixels, with `data` as its only (compressed) image data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(data))
        + chunk(b"IEND", b"")
    )


# Pillow formats with the modes each can store: every decoder path the data code has to convert.
ENCODINGS = [
    ("PNG", "RGB"),
    ("PNG", "L"),
    ("PNG", "RGBA"),
    ("PNG", "I;16"),
    ("PNG", "P"),
    ("PNG", "LA"),
    ("JPEG", "RGB"),
    ("JPEG", "L"),
    ("JPEG", "CMYK"),
    ("WEBP", "RGB"),
    ("WEBP", "RGBA"),
    ("BMP", "RGB"),
    ("BMP", "P"),
    ("TIFF", "F"),
    ("GIF", "P"),
]


@st.composite
def encoded_images(draw) -> bytes:
    image_format, mode = draw(st.sampled_from(ENCODINGS))
    width, height = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    values = np.random.default_rng(draw(st.integers(0, 2**16))).random((height, width, 3))
    image = Image.fromarray((values * 255).astype(np.uint8)).convert(mode if mode not in ("I;16", "F") else "L")
    if mode in ("I;16", "F"):
        image = (
            image.convert("I").convert(mode)
            if mode == "F"
            else Image.fromarray((values[..., 0] * 65535).astype(np.uint16))
        )
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


@st.composite
def damaged(draw, original: bytes) -> bytes:
    """`original`, or a copy cut short, with one bit flipped, or with random bytes written over a stretch."""
    how = draw(st.sampled_from(["as is", "cut", "bit", "overwritten"]))
    if how == "as is" or not original:
        return original
    at = draw(st.integers(0, len(original) - 1))
    if how == "cut":
        return original[:at]
    if how == "bit":
        return original[:at] + bytes([original[at] ^ (1 << draw(st.integers(0, 7)))]) + original[at + 1 :]
    noise = draw(st.binary(min_size=1, max_size=64))
    return original[:at] + noise + original[at + len(noise) :]


photo_bytes = st.one_of(
    st.binary(max_size=256),
    st.builds(png_header, st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1)),
    st.builds(png_header, st.integers(9_000, 20_000), st.integers(9_000, 20_000)),  # past Pillow's bomb warning
    encoded_images(),
    encoded_images().flatmap(damaged),
)
photo_names = st.tuples(
    st.text(st.characters(codec="utf-8", exclude_characters="/\x00"), min_size=1, max_size=12),
    st.sampled_from([*IMAGE_SUFFIXES, ".PNG", ".JPG", ".jpeg.txt"]),
).map("".join)
caption_bytes = st.one_of(
    st.binary(max_size=128),
    st.text(max_size=64).map(str.encode),
    st.just(b""),
    st.integers(100_000, 1_000_000).map(lambda n: b"word " * (n // 5)),
)
metadata_lines = st.one_of(
    st.builds(
        lambda name, text: json.dumps({"file_name": name, "text": text}),
        st.sampled_from(["good.png", "./good.png", "good.PNG"]) | st.text(max_size=12),
        documents,
    ),
    documents.map(lambda value: json.dumps(value)),
    st.sampled_from(["[" * 100_000, "1" * 5000, '{"file_name": ' + "9" * 5000 + "}", "\x00", "{", ""]),
    st.binary(max_size=64).map(lambda raw: raw.decode("latin-1")),
)

# ------------------------------------------------------------------------------------------------ checks


def error_line(result) -> str:
    """The command's one stderr line, after checking it ended with exit code 2 through its own error handling."""
    assert clean_exit(result), f"traceback: {result.exception!r}"
    assert result.exit_code == 2, (result.exit_code, result.output)
    # transformers draws a progress bar while loading an encoder: carriage-return lines, not messages.
    lines = [line for line in result.stderr.split("\n") if line.strip() and not line.startswith("\r")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def names_key_or(line: str, *names: str) -> bool:
    """True when the error line names a config key or one of `names`."""
    return "config key '" in line or any(printable(name) in line for name in names)


def assert_complete_or_absent(folder: Path, expected: str | None) -> None:
    """`folder` holds exactly the finished file `expected` (loadable, finite), or nothing when `expected` is None."""
    found = sorted(p.name for p in folder.rglob("*")) if folder.exists() else []
    assert found == ([expected] if expected else []), found
    if expected:
        tensors = load_file(str(folder / expected))
        assert tensors and all(torch.isfinite(t).all() for t in tensors.values())


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    """A folder for the generated cases (hypothesis runs many cases per test, so not pytest's per-test tmp_path)."""
    with tempfile.TemporaryDirectory(prefix="input-sweep-") as folder:
        yield Path(folder)


def fresh(scratch: Path) -> Path:
    """A new empty folder for one generated case."""
    return Path(tempfile.mkdtemp(dir=scratch))


# ------------------------------------------------------------------------------------------------ --set and config


@given(key=set_keys, value=set_values)
def test_any_set_override_is_accepted_or_one_line_naming_the_key(scratch, key, value):
    case = fresh(scratch)
    result = runner.invoke(
        app, ["train", "--images", str(case / "no-photos"), "--output", str(case / "run"), "--set", f"{key}={value}"]
    )
    line = error_line(result)  # the data folder does not exist, so a good override ends there
    assert names_key_or(line, key.strip(), "--images"), line
    assert not (case / "run").exists()


@given(document=config_files)
def test_any_config_file_is_accepted_or_one_line_naming_it(scratch, document):
    case = fresh(scratch)
    config = case / "config.yaml"
    config.write_bytes(document)
    result = runner.invoke(
        app, ["train", "--config", str(config), "--images", str(case / "no-photos"), "--output", str(case / "run")]
    )
    line = error_line(result)
    assert names_key_or(line, str(config), "--images"), line
    assert not (case / "run").exists()


# ------------------------------------------------------------------------------------------------ field folders


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> TinyField:
    return tiny_field(tmp_path_factory)


json_values = st.one_of(
    documents, st.integers(min_value=10**30), st.sampled_from([-1, 0, 1, 10**9, [], {}, [-1], [0, 4]])
)
FIELD_FILES = ["config.json", "model.safetensors"]


def damage_field(field: Path, data) -> None:
    """Damage the field folder as a user's edit, a copy cut short or a flipped bit would."""
    how = data.draw(
        st.sampled_from(
            [
                "record key",
                "field setting",
                "layout entry",
                "record text",
                "weights bytes",
                "weights header",
                "missing",
                "a folder",
            ]
        )
    )
    config, weights = field / "config.json", field / "model.safetensors"
    record = json.loads(config.read_text())
    if how == "record key":
        key = data.draw(st.sampled_from([*REQUIRED_RECORD, "format", "sdxl_layers_per_block"]))
        if data.draw(st.booleans()):
            record.pop(key, None)
        else:
            record[key] = data.draw(json_values)
    elif how == "field setting":
        record["field"][data.draw(st.sampled_from([*record["field"], "from_the_future"]))] = data.draw(json_values)
    elif how == "layout entry":
        record["layout"][data.draw(st.sampled_from(sorted(record["layout"])))] = data.draw(json_values)
    if how in ("record key", "field setting", "layout entry"):
        config.write_text(json.dumps(record))
    elif how == "record text":
        config.write_bytes(
            data.draw(
                st.one_of(
                    st.binary(max_size=64),
                    st.sampled_from([b"[" * 100_000, b"1" * 5000, b"{}", b"null", b'{"format": "hyperfields-field"}']),
                )
            )
        )
    elif how == "weights bytes":
        weights.write_bytes(data.draw(damaged(weights.read_bytes())))
    elif how == "weights header":  # the JSON header after the 8-byte length: dtypes, shapes, offsets
        raw = weights.read_bytes()
        size = struct.unpack("<Q", raw[:8])[0]
        at = data.draw(st.integers(8, 8 + size - 1))
        raw = raw[:at] + data.draw(st.binary(min_size=1, max_size=4)) + raw[at + 1 :]
        weights.write_bytes(raw)
    elif how == "missing":
        (field / data.draw(st.sampled_from(FIELD_FILES))).unlink()
    else:
        path = field / data.draw(st.sampled_from(FIELD_FILES))
        path.unlink()
        path.mkdir()


@settings(max_examples=FEW)
@given(data=st.data())
def test_a_damaged_field_folder_exports_or_fails_in_one_line_naming_it(scratch, trained, data):
    case = fresh(scratch)
    field = shutil.copytree(trained.field, case / "field")
    damage_field(field, data)
    out = case / "out"
    result = runner.invoke(
        app, ["export", "--field", str(field), "--image", str(trained.photo), "--output", str(out / "lora.safetensors")]
    )
    event(f"exit code {result.exit_code}")
    if result.exit_code == 0:
        assert_complete_or_absent(out, "lora.safetensors")
    else:
        assert str(field) in error_line(result)
        assert_complete_or_absent(out, None)


# ------------------------------------------------------------------------------------------------ precomputed weights


@pytest.fixture(scope="module")
def precomputed(tmp_path_factory) -> tuple[Path, Path, QuadraticTask, list[ImageRecord]]:
    """A precomputed folder for the quadratic task's layout and three training images."""
    root = tmp_path_factory.mktemp("precomputed")
    task = QuadraticTask()
    records = [ImageRecord(path=root / "photos" / f"p{i}.png", caption="x") for i in range(3)]
    theta_T = {name: torch.randn(len(records), *shape) for name, shape in task.layout().items()}
    record = {"task": "lora", "steps": 6, "layout": {name: list(shape) for name, shape in task.layout().items()}}
    folder = write_precomputed(
        root / "theta", theta_T, task.initial_weights(), [f"photos/p{i}.png" for i in range(3)], record
    )
    return folder, root, task, records


DTYPES = [torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int64, torch.uint8, torch.bool]


def damage_precomputed(folder: Path, data) -> None:
    """Damage the folder: tensors of another dtype, shape or with NaN/Inf, a damaged header, an edited index."""
    weights, index = folder / WEIGHTS_NAME, folder / INDEX_NAME
    how = data.draw(st.sampled_from(["dtype", "non-finite", "shape", "drop", "bytes", "absurd shape", "index"]))
    tensors = load_file(str(weights))
    name = data.draw(st.sampled_from(sorted(tensors)))
    if how == "dtype":
        tensors[name] = tensors[name].to(data.draw(st.sampled_from(DTYPES)))
    elif how == "non-finite":
        flat = tensors[name].flatten().clone()
        flat[data.draw(st.integers(0, flat.numel() - 1))] = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        tensors[name] = flat.reshape(tensors[name].shape)
    elif how == "shape":
        tensors[name] = torch.zeros(data.draw(st.lists(st.integers(0, 5), max_size=3)))
    elif how == "drop":
        del tensors[name]
    if how in ("dtype", "non-finite", "shape", "drop"):
        save_file(tensors, str(weights))
    elif how == "bytes":
        weights.write_bytes(data.draw(damaged(weights.read_bytes())))
    elif how == "absurd shape":  # a header that claims more elements than any file holds
        raw = weights.read_bytes()
        size = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8 : 8 + size])
        header[name]["shape"] = data.draw(st.lists(st.integers(0, 2**62), min_size=1, max_size=4))
        text = json.dumps(header).encode()
        weights.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + size :])
    else:
        record = json.loads(index.read_text())
        key = data.draw(st.sampled_from([*record, "images"]))
        record[key] = data.draw(st.one_of(json_values, st.just({"photos/p0.png": 0, "photos/p1.png": 0})))
        index.write_text(json.dumps(record))


@given(data=st.data())
def test_damaged_precomputed_weights_load_finite_or_fail_in_one_line_naming_the_folder(scratch, precomputed, data):
    original, root, task, records = precomputed
    folder = shutil.copytree(original, fresh(scratch) / "theta")
    damage_precomputed(folder, data)
    try:
        theta_T = load_precomputed(folder, task, records, root, steps=6)
    except UserError as error:
        assert str(folder) in str(error) and "\n" not in str(error)
        event("refused")
        return
    event("loaded")
    for name, shape in task.layout().items():
        assert theta_T[name].shape == (len(records), *shape)
        assert theta_T[name].is_floating_point() and torch.isfinite(theta_T[name]).all()


# ------------------------------------------------------------------------------------------------ photos and folders


@given(name=photo_names, content=photo_bytes)
def test_any_photo_file_is_read_or_refused_in_one_line_naming_it(scratch, name, content):
    path = fresh(scratch) / name
    path.write_bytes(content)
    with warnings.catch_warnings(record=True) as caught:  # a warning would print lines of its own on stderr
        warnings.simplefilter("always")
        try:
            photo = read_photo(path, 16)
        except UserError as error:
            assert str(path) in str(error) and "\n" not in str(error).replace(str(path), "")  # the CLI escapes it
            photo = None
    event("refused" if photo is None else "read")
    assert not [str(warning.message) for warning in caught]
    assert photo is None or (photo.pixels.shape == (3, 16, 16) and torch.isfinite(photo.pixels).all())


@settings(max_examples=FEW)
@given(content=photo_bytes)
def test_export_of_any_photo_writes_a_complete_lora_or_one_line_naming_the_photo(scratch, trained, content):
    case = fresh(scratch)
    photo = case / "photo.png"
    photo.write_bytes(content)
    result = runner.invoke(
        app,
        [
            "export",
            "--field",
            str(trained.field),
            "--image",
            str(photo),
            "--output",
            str(case / "out" / "lora.safetensors"),
        ],
    )
    event(f"exit code {result.exit_code}")
    if result.exit_code == 0:
        assert_complete_or_absent(case / "out", "lora.safetensors")
    else:
        assert str(photo) in error_line(result)
        assert_complete_or_absent(case / "out", None)


@given(
    good=st.booleans(),
    files=st.lists(st.tuples(photo_names, photo_bytes, st.none() | caption_bytes), max_size=3),
    metadata=st.none() | st.lists(metadata_lines, max_size=4),
)
def test_any_image_folder_scans_or_fails_in_one_line_and_every_warning_is_one_line(scratch, good, files, metadata):
    folder = fresh(scratch) / "photos"
    folder.mkdir()
    if good:  # one photo that decodes, so its caption file and metadata entry are read
        Image.new("RGB", (8, 8)).save(folder / "good.png")
    for name, content, caption in files:
        (folder / name).write_bytes(content)
        if caption is not None:
            (folder / name).with_suffix(".txt").write_bytes(caption)
    if metadata is not None:
        (folder / "metadata.jsonl").write_text("\n".join(metadata), encoding="utf-8", errors="surrogateescape")
    warned: list[str] = []
    with warnings.catch_warnings(record=True) as caught:  # a Python warning would print lines of its own on stderr
        warnings.simplefilter("always")
        try:
            report = scan_image_folder(folder, warn=warned.append)
        except UserError as error:
            assert str(folder) in str(error) and "\n" not in str(error)
            event("refused")
        else:
            assert all(isinstance(record.caption, str) and record.caption for record in report.records)
            event(f"{len(report.records)} usable photos, {len(warned)} warnings")
    assert not [str(warning.message) for warning in caught]
    assert all("\n" not in warning and str(folder) in warning for warning in warned), warned


def test_default_config_file_is_accepted(scratch):
    result = runner.invoke(
        app,
        [
            "train",
            "--config",
            str(ROOT / "configs" / "tiny.yaml"),
            "--images",
            str(scratch / "none"),
            "--output",
            str(scratch / "run"),
        ],
    )
    assert "--images" in error_line(result)  # the sweeps above rely on a good config reaching the data check


# ------------------------------------------------------------------------------------------------ holes found


def test_set_value_that_is_not_yaml_is_one_line_naming_the_key(scratch):
    # In double quotes YAML reads \. and \d as escapes; this value used to end in a yaml.scanner traceback.
    result = runner.invoke(
        app,
        [
            "train",
            "--images",
            str(scratch / "none"),
            "--output",
            str(scratch / "run"),
            "--set",
            'lora.targets=["re:(time|add)_embedding\\.linear_\\d"]',
        ],
    )
    line = error_line(result)
    assert "override 'lora.targets=...'" in line and "unknown escape character" in line and "single quotes" in line, (
        line
    )
    assert load_config(None, ["lora.targets=['re:(time|add)_embedding\\.linear_\\d']"]).lora.targets == [
        "re:(time|add)_embedding\\.linear_\\d"
    ]


@pytest.mark.parametrize(
    "text", ["[" * 1100, "1" * 5000, "2020-13-45"], ids=["deep nesting", "5000 digits", "no such date"]
)
def test_yaml_beyond_the_parser_is_one_line_in_a_file_and_in_set(tmp_path, text):
    config = tmp_path / "config.yaml"
    config.write_text(f"train:\n  seed: {text}\n")
    with pytest.raises(UserError, match=f"config file '{config}' is not usable YAML"):
        load_config(config)
    with pytest.raises(UserError, match=r"override 'train.seed=...': the value is not usable YAML"):
        load_config(None, [f"train.seed={text}"])


def test_config_path_that_is_a_folder_is_one_line(tmp_path):
    with pytest.raises(UserError, match=f"config file '{tmp_path}' cannot be read"):
        load_config(tmp_path)


@pytest.mark.parametrize("value", ["[1]", "~", "{a: 1}", ".nan", "-.inf", "1e999", str(10**400), str(2**63)])
def test_a_number_key_given_a_list_null_or_non_finite_value_is_one_line_naming_it(value):
    key = "train.seed" if value == str(2**63) else "train.learning_rate"
    with pytest.raises(UserError, match=f"config key '{key}'"):
        load_config(None, [f"{key}={value}"])


def test_an_error_line_stays_one_line_whatever_the_key_holds(scratch):
    result = runner.invoke(
        app,
        [
            "train",
            "--images",
            str(scratch / "none"),
            "--output",
            str(scratch / "run"),
            "--set",
            "train.max\nsteps\x1b[2J=3",
        ],
    )
    assert "unknown config key 'train.max\\nsteps\\x1b[2J'" in error_line(result)


def edited_field(trained: TinyField, folder: Path, **changes) -> Path:
    """A copy of the tiny field whose config.json has `changes`: record keys, `field__<setting>`, `layout` (first)."""
    field = shutil.copytree(trained.field, folder)
    record = json.loads((field / "config.json").read_text())
    for key, value in changes.items():
        where, _, name = key.partition("__")
        if where == "layout":
            record["layout"][next(iter(record["layout"]))] = value
        elif where == "field":
            record["field"][name] = value
        else:
            record[key] = value
    (field / "config.json").write_text(json.dumps(record))
    return field


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"layout": [-1, 4]}, "no valid 'layout'"),
        ({"layout": 10**30}, "no valid 'layout'"),
        ({"layout": [4, 10**9]}, "layout"),  # the weights have another shape: refused before allocating it
        ({"field__width": 10**9}, "width 1000000000 (the weights have 32)"),
        ({"field__depth": 10**9}, "depth 1000000000 (the weights have 1)"),
        ({"field__mlp_ratio": 1e9}, "mlp_hidden"),
        ({"field__heads": 5}, "build no field"),
        ({"steps": 0}, "no valid 'steps'"),
        ({"steps": True}, "no valid 'steps'"),
        ({"resolution": -3}, "no valid 'resolution'"),
        ({"resolution": 10**5}, "no valid 'resolution' (from 1 to 9459 expected)"),
        ({"steps": 10**30}, "no valid 'steps' (from 1 to 2**63 - 1 expected)"),
    ],
    ids=lambda value: json.dumps(value) if isinstance(value, dict) else None,
)
def test_an_edited_field_record_is_one_line_before_the_field_is_built(trained, tmp_path, changes, expected):
    field = edited_field(trained, tmp_path / "field", **changes)
    with pytest.raises(UserError, match=re.escape(expected)) as error:
        load_field(field)
    assert str(field) in str(error.value)


def test_field_config_that_is_a_folder_or_beyond_the_json_parser_is_one_line(trained, tmp_path):
    field = shutil.copytree(trained.field, tmp_path / "field")
    (field / "config.json").write_text("[" * 100_000)
    with pytest.raises(UserError, match="config.json is not valid JSON"):
        load_field(field)
    (field / "config.json").unlink()
    (field / "config.json").mkdir()
    with pytest.raises(UserError, match="config.json cannot be read"):
        load_field(field)


def test_field_weights_with_nan_are_refused_by_name(trained, tmp_path):
    field = shutil.copytree(trained.field, tmp_path / "field")
    tensors = load_file(str(field / "model.safetensors"))
    tensors["tokens"][0, 0] = math.nan
    save_file(tensors, str(field / "model.safetensors"))
    with pytest.raises(UserError, match="tensor 'tokens' is NaN or infinite"):
        load_field(field)


@pytest.mark.parametrize("damage", ["int8", "nan", "deep index"])
def test_precomputed_weights_that_are_not_finite_floats_are_refused(precomputed, tmp_path, damage):
    original, root, task, records = precomputed
    folder = shutil.copytree(original, tmp_path / "theta")
    tensors = load_file(str(folder / WEIGHTS_NAME))
    if damage == "int8":
        tensors["layer.bias"] = tensors["layer.bias"].to(torch.int8)
    elif damage == "nan":
        tensors["layer.bias"][1, 2] = math.nan
    else:
        (folder / INDEX_NAME).write_text("[" * 100_000)
    save_file(tensors, str(folder / WEIGHTS_NAME))
    expected = {"int8": "'layer.bias' has dtype torch.int8", "nan": "'layer.bias' has NaN", "deep index": "unreadable"}
    with pytest.raises(UserError, match=re.escape(expected[damage])):
        load_precomputed(folder, task, records, root, steps=6)


def test_photo_past_pillows_warning_limit_is_refused_without_a_warning_or_decoding(tmp_path):
    # 9500 x 9500 is above Pillow's limit but below twice it, where Pillow only warns and then decodes 270 MB.
    photo = tmp_path / "large.png"
    photo.write_bytes(png_header(9_500, 9_500, bytes(9_500 * 3 + 1) * 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserError, match=f"photo '{photo}' cannot be read.*exceeds limit"):
            read_photo(photo, 16)


def test_metadata_lines_beyond_the_json_parser_are_skipped_with_one_warning_each(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "good.png")
    (tmp_path / METADATA_NAME).write_text(
        "[" * 100_000 + "\n" + "1" * 5000 + '\n{"file_name": "good.png", "text": ""}\n'
    )
    warned: list[str] = []
    report = scan_image_folder(tmp_path, warn=warned.append)
    assert [record.caption for record in report.records] == ["a photo of sks"]
    assert [w.split(": ")[1] for w in warned[:2]] == [f"{tmp_path / METADATA_NAME}:1", f"{tmp_path / METADATA_NAME}:2"]
    assert str(tmp_path / "good.png") in warned[2] and "empty" in warned[2]  # names the photo, not only its file name


def current_umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def test_every_written_file_gets_the_permissions_of_an_ordinary_file(trained, precomputed, tmp_path):
    """Fields, checkpoints, LoRA files, precomputed weights, samples: 0o666 less the umask, as a file the user makes."""
    from hyperfields.field.io import save_field
    from hyperfields.files import replace_folder
    from hyperfields.generate import write_image
    from hyperfields.training.ema import EMA

    written = [
        trained.field / "model.safetensors",
        trained.field / "config.json",
        *(trained.field.parent / "checkpoints").rglob("*.*"),
    ]  # written by training under the default umask
    assert {oct(path.stat().st_mode & 0o777) for path in written} == {oct(0o666 & ~current_umask())}

    previous = os.umask(0o027)
    try:
        field, record = load_field(trained.field)
        save_field(field, tmp_path / "field", record)
        exported = [
            "export",
            "--field",
            str(trained.field),
            "--image",
            str(trained.photo),
            "--output",
            str(tmp_path / "a.safetensors"),
        ]
        assert runner.invoke(app, exported).exit_code == 0
        original, *_ = precomputed
        tensors = load_file(str(original / WEIGHTS_NAME))
        write_precomputed(
            tmp_path / "theta",
            {k: v for k, v in tensors.items() if not k.startswith(THETA0_PREFIX)},
            {k.removeprefix(THETA0_PREFIX): v for k, v in tensors.items() if k.startswith(THETA0_PREFIX)},
            ["p0.png", "p1.png", "p2.png"],
            {},
        )
        write_image(Image.new("RGB", (8, 8)), tmp_path / "samples", {"step": 1.0})
        EMA([torch.nn.Parameter(torch.zeros(2))], 0.9).save(tmp_path / "ema.safetensors")
        staging = tmp_path / ".checkpoint-staging"  # accelerate's save_state writes owner-only safetensors
        staging.mkdir()
        save_file({"a": torch.zeros(1)}, str(staging / "model.safetensors"))
        replace_folder(staging, tmp_path / "checkpoint-1")
    finally:
        os.umask(previous)
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert len(files) >= 10
    assert {path.relative_to(tmp_path).as_posix(): oct(path.stat().st_mode & 0o777) for path in files} == {
        path.relative_to(tmp_path).as_posix(): oct(0o640) for path in files
    }


def test_a_file_name_with_a_line_break_cannot_split_a_warning(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "good.png")
    (tmp_path / "bad\nname.png").write_bytes(b"not a photo")
    warned: list[str] = []
    scan_image_folder(tmp_path, warn=warned.append)
    assert warned == [f"skipping {tmp_path}/bad\\nname.png: not an image Pillow can read"]


def test_a_tiff_with_corrupt_exif_is_refused_without_a_python_warning(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "good.png")
    photo = tmp_path / "broken.jpg"
    photo.write_bytes(b"II\x00*\x00\x00\x00\x01")  # Pillow's TIFF reader warns "Corrupt EXIF data" before it fails
    warned: list[str] = []
    with warnings.catch_warnings(record=True) as caught:  # a Python warning would print lines of its own on stderr
        warnings.simplefilter("always")
        with pytest.raises(UserError, match=f"photo '{photo}' cannot be read"):
            read_photo(photo, 16)
        scan_image_folder(tmp_path, warn=warned.append)
    assert not [str(warning.message) for warning in caught]
    assert len(warned) == 1 and warned[0].startswith(f"skipping {photo}: ")
