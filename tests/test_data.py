"""The pair schema: loaders (JSONL, CSV, Parquet, directory, list, datasets), prompts, digest, errors."""
from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lmms_sgm import data
from lmms_sgm.data import DataError, Pair, load_pairs


def png_bytes(seed: int, size: int = 32) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


ROWS = [
    {"image": "img/0.png", "text": "you stupid idiot", "label": 1, "question": "what is this ?", "category": "insult"},
    {"image": "img/1.png", "text": "a red circle", "label": 0, "question": "what colour ?", "category": None},
    {"image": "img/2.png", "text": "i hate this", "label": 1, "question": "how many ?", "category": "hate"},
    {"image": "img/3.png", "text": "this is nice", "label": 0, "question": None, "category": None},
]


@pytest.fixture
def dataset_dir(tmp_path):
    """A folder with img/*.png and ROWS, plus the expected decoded pixels of each image."""
    (tmp_path / "img").mkdir()
    for i in range(len(ROWS)):
        (tmp_path / "img" / f"{i}.png").write_bytes(png_bytes(i))
    return tmp_path


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def check_rows(ds, rows=ROWS, base: Path | None = None):
    assert len(ds) == len(rows)
    assert ds.labels == [r["label"] for r in rows]
    for pair, row, i in zip(ds, rows, range(len(rows))):
        assert isinstance(pair, Pair)
        assert pair.text == row["text"] and pair.label == row["label"]
        assert pair.question == row["question"] and pair.category == row["category"]
        assert isinstance(pair.label, int)
        np.testing.assert_array_equal(pixels(pair.load_image()), pixels(Image.open(io.BytesIO(png_bytes(i)))))
        if base is not None:
            assert Path(pair.image) == base / row["image"]
    assert ds.counts() == {
        "examples": len(rows),
        "toxic": sum(r["label"] for r in rows),
        "non_toxic": len(rows) - sum(r["label"] for r in rows),
    }


# ---------------------------------------------------------------- loaders


def test_jsonl(dataset_dir):
    path = write_jsonl(dataset_dir / "pairs.jsonl", ROWS)
    ds = load_pairs(path)
    check_rows(ds, base=dataset_dir)
    assert load_pairs(str(path)).digest() == ds.digest()


def test_json_array(dataset_dir):
    (dataset_dir / "pairs.json").write_text(json.dumps(ROWS))
    check_rows(load_pairs(dataset_dir / "pairs.json"), base=dataset_dir)


def test_csv(dataset_dir):
    path = dataset_dir / "pairs.csv"
    pd.DataFrame(ROWS).to_csv(path, index=False)
    ds = load_pairs(path)
    check_rows(ds, base=dataset_dir)
    assert ds.digest() == load_pairs(write_jsonl(dataset_dir / "same.jsonl", ROWS)).digest()


def test_parquet(dataset_dir):
    path = dataset_dir / "pairs.parquet"
    pd.DataFrame(ROWS).to_parquet(path)
    ds = load_pairs(path)
    check_rows(ds, base=dataset_dir)
    assert ds.digest() == load_pairs(write_jsonl(dataset_dir / "same.jsonl", ROWS)).digest()


def test_parquet_with_image_bytes(tmp_path):
    rows = [dict(r, image=png_bytes(i)) for i, r in enumerate(ROWS)]
    pd.DataFrame(rows).to_parquet(tmp_path / "pairs.parquet")
    ds = load_pairs(tmp_path / "pairs.parquet")
    check_rows(ds, rows)
    assert all(isinstance(p.image, bytes) for p in ds)


def test_directory_with_one_data_file(dataset_dir):
    sub = dataset_dir / "data"
    sub.mkdir()
    shutil.move(str(dataset_dir / "img"), sub / "img")
    write_jsonl(sub / "train.jsonl", ROWS)
    (sub / "README.txt").write_text("not data")
    check_rows(load_pairs(sub), base=sub)
    # two data files: ambiguous, refused with both names
    pd.DataFrame(ROWS).to_csv(sub / "other.csv", index=False)
    with pytest.raises(DataError, match=r"exactly one data file.*other\.csv.*train\.jsonl"):
        load_pairs(sub)


def test_list_of_dicts(dataset_dir):
    rows = [dict(r, image=str(dataset_dir / r["image"])) for r in ROWS]
    ds = load_pairs(rows)
    check_rows(ds, rows)
    assert ds.digest() == load_pairs(write_jsonl(dataset_dir / "same.jsonl", ROWS)).digest()


def test_image_as_bytes_and_pil(dataset_dir):
    rows = [dict(r, image=png_bytes(i)) for i, r in enumerate(ROWS)]
    rows[1]["image"] = Image.open(io.BytesIO(png_bytes(1)))
    rows[2]["image"] = {"bytes": png_bytes(2), "path": None}
    rows[3]["image"] = {"bytes": None, "path": str(dataset_dir / "img" / "3.png")}
    check_rows(load_pairs(rows), rows)


def test_datasets_with_bytes_column():
    rows = [dict(r, image=png_bytes(i)) for i, r in enumerate(ROWS)]
    ds = datasets.Dataset.from_list(rows)
    check_rows(load_pairs(ds), rows)
    dd = datasets.DatasetDict({"train": ds})
    check_rows(load_pairs(dd, split="train"), rows)


@pytest.mark.parametrize("decode", [True, False])
def test_datasets_image_feature(dataset_dir, decode):
    rows = [dict(r, image=str(dataset_dir / r["image"])) for r in ROWS]
    ds = datasets.Dataset.from_list(rows).cast_column("image", datasets.Image(decode=decode))
    pairs = load_pairs(ds)
    check_rows(pairs, rows)
    assert pairs.digest() == load_pairs(datasets.Dataset.from_list(rows).cast_column("image", datasets.Image(decode=decode))).digest()


def test_pair_dataset_passes_through(dataset_dir):
    ds = load_pairs(write_jsonl(dataset_dir / "pairs.jsonl", ROWS))
    assert load_pairs(ds) is ds


# ---------------------------------------------------------------- chat prompts


@pytest.fixture(scope="module")
def processor(model_and_processor):
    return model_and_processor[1]


def test_text_field_response(processor):
    pair = Pair(image=png_bytes(0), text="you stupid idiot", label=1, question="what is this ?")
    assert data.format_prompt(processor, pair, "response") == "<s>USER: <image> you stupid idiot "
    msgs = data.messages_for(pair, "response")
    assert [m["role"] for m in msgs] == ["user"]


def test_text_field_question(processor):
    pair = Pair(image=png_bytes(0), text="you stupid idiot", label=1, question="what is this ?")
    prompt = data.format_prompt(processor, pair, "question")
    assert prompt == "<s>USER: <image> what is this ? "
    assert "stupid" not in prompt


def test_text_field_question_and_response(processor):
    pair = Pair(image=png_bytes(0), text="you stupid idiot", label=1, question="what is this ?")
    prompt = data.format_prompt(processor, pair, "question+response")
    assert prompt == "<s>USER: <image> what is this ? ASSISTANT: you stupid idiot </s> "
    msgs = data.messages_for(pair, "question+response")
    assert [m["role"] for m in msgs] == ["user", "assistant"]
    assert msgs[1]["content"] == [{"type": "text", "text": "you stupid idiot"}]
    assert {"type": "image"} in msgs[0]["content"] and {"type": "image"} not in msgs[1]["content"]


def test_encode_batch_right_pads_and_expands_image(processor, toy_pairs):
    short = Pair(image=png_bytes(0), text="ugly idiot", label=1)
    long = Pair(image=png_bytes(1), text="the picture shows a red circle", label=0)
    enc = data.encode_batch(processor, [short, long], "response")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert ids.shape[0] == 2 and enc["pixel_values"].shape[:2] == (2, 3)
    assert mask[0].sum() < mask[1].sum() and mask[0, 0] == 1 and mask[0, -1] == 0  # right padding
    left = data.encode_batch(processor, [short, long], "response", padding_side="left")["attention_mask"]
    assert left[0, 0] == 0 and left[0, -1] == 1  # for generate
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert ((ids == image_id).sum(1) == 16).all()  # (32 / 8) ** 2 patches per image
    words = processor.tokenizer.convert_ids_to_tokens(ids[1][mask[1].bool()].tolist())
    assert words[-6:] == ["the", "picture", "shows", "a", "red", "circle"]


@pytest.mark.parametrize("field", ["question", "question+response"])
def test_question_missing(processor, field):
    pair = Pair(image=png_bytes(0), text="a red circle", label=0, question=None)
    with pytest.raises(DataError, match=re.escape(f"text_field='{field}' needs a 'question'")):
        data.format_prompt(processor, pair, field)
    assert data.format_prompt(processor, pair, "response")  # response alone needs no question


# ---------------------------------------------------------------- digest


def test_digest_tracks_labels_texts_and_image_bytes(dataset_dir):
    base = load_pairs(write_jsonl(dataset_dir / "a.jsonl", ROWS)).digest()
    assert len(base) == 64 and base == load_pairs(dataset_dir / "a.jsonl").digest()

    flipped = [dict(r) for r in ROWS]
    flipped[2]["label"] = 0
    assert load_pairs(write_jsonl(dataset_dir / "b.jsonl", flipped)).digest() != base

    edited = [dict(r) for r in ROWS]
    edited[1]["text"] = "a red square"
    assert load_pairs(write_jsonl(dataset_dir / "c.jsonl", edited)).digest() != base

    # one byte of one image file
    img = dataset_dir / "img" / "3.png"
    raw = bytearray(img.read_bytes())
    raw[-1] ^= 1
    img.write_bytes(bytes(raw))
    assert load_pairs(dataset_dir / "a.jsonl").digest() != base


def test_digest_of_image_bytes():
    rows = [dict(r, image=png_bytes(i)) for i, r in enumerate(ROWS)]
    base = load_pairs(rows).digest()
    changed = [dict(r) for r in rows]
    img = np.array(Image.open(io.BytesIO(rows[0]["image"])))
    img[5, 7, 1] ^= 1  # one pixel (a flipped byte inside the PNG would fail its checksum)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    changed[0]["image"] = buf.getvalue()
    assert load_pairs(changed).digest() != base
    assert load_pairs([dict(r) for r in rows]).digest() == base


# ---------------------------------------------------------------- errors


def test_missing_image_file_names_record_and_path(dataset_dir):
    rows = [dict(r) for r in ROWS]
    rows[2]["image"] = "img/missing.png"
    path = write_jsonl(dataset_dir / "pairs.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_pairs(path)
    msg = str(err.value)
    assert "record 2" in msg and str(dataset_dir / "img" / "missing.png") in msg and str(path) in msg


def _truncated(raw: bytes) -> bytes:
    return raw[: len(raw) // 2]


def _bad_checksum(raw: bytes) -> bytes:
    b = bytearray(raw)
    b[len(b) // 2] ^= 0x10  # inside the image data: PNG's CRC catches it
    return bytes(b)


@pytest.mark.parametrize("spoil", [lambda raw: b"plain text, not an image", _truncated, _bad_checksum],
                         ids=["not-an-image", "truncated", "bad-checksum"])
def test_unreadable_image_file_names_record_and_path(dataset_dir, spoil):
    """Images are opened, verified and decoded while the data is loaded, not when profiling meets them."""
    img = dataset_dir / "img" / "2.png"
    img.write_bytes(spoil(img.read_bytes()))
    path = write_jsonl(dataset_dir / "pairs.jsonl", ROWS)
    with pytest.raises(DataError) as err:
        load_pairs(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: record 2: image {img} is not a readable image (") and "\n" not in msg


def test_unreadable_image_bytes_name_the_record(monkeypatch):
    from PIL import ImageFile

    # lmms-eval sets this process-wide when imported (as in the lmms-eval wrapper's process).
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    rows = [dict(r, image=png_bytes(i)) for i, r in enumerate(ROWS)]
    rows[3]["image"] = _truncated(rows[3]["image"])
    with pytest.raises(DataError, match=r"<list>: record 3: the bytes image is not a readable image"):
        load_pairs(rows)
    rows[3]["image"] = {"bytes": b"GIF89a nonsense", "path": None}
    with pytest.raises(DataError, match=r"record 3: the bytes image is not a readable image"):
        load_pairs(rows)
    # JPEG has no checksums: verify() passes a truncated one; decoding it does not.
    buf = io.BytesIO()
    Image.open(io.BytesIO(png_bytes(3, size=64))).save(buf, format="JPEG")
    rows[3]["image"] = _truncated(buf.getvalue())
    with pytest.raises(DataError, match=r"record 3: the bytes image is not a readable image \(OSError: image file is truncated"):
        load_pairs(rows)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored


def test_image_that_breaks_after_validation_names_the_file(dataset_dir):
    ds = load_pairs(write_jsonl(dataset_dir / "pairs.jsonl", ROWS))
    (dataset_dir / "img" / "1.png").write_bytes(b"gone bad")
    with pytest.raises(DataError, match=r"image .*img/1.png is not a readable image"):
        ds[1].load_image()


@pytest.mark.parametrize("field", ["text", "label"])
def test_missing_field(dataset_dir, field):
    rows = [dict(r) for r in ROWS]
    del rows[1][field]
    with pytest.raises(DataError, match=rf"record 1 lacks required field\(s\) \['{field}'\]"):
        load_pairs(write_jsonl(dataset_dir / "pairs.jsonl", rows))
    # also a null in a CSV cell
    rows = [dict(r) for r in ROWS]
    rows[3][field] = None
    pd.DataFrame(rows).to_csv(dataset_dir / "p.csv", index=False)
    with pytest.raises(DataError, match=rf"record 3 lacks required field\(s\) \['{field}'\]"):
        load_pairs(dataset_dir / "p.csv")


def test_missing_image_among_image_pairs_names_the_record(dataset_dir):
    """A record without an image in an image dataset is a mistake, not a text-only record."""
    rows = [dict(r) for r in ROWS]
    del rows[1]["image"]
    with pytest.raises(DataError, match=r"record 1 has no image but record 0 has one: .* not both"):
        load_pairs(write_jsonl(dataset_dir / "pairs.jsonl", rows))
    rows = [dict(r) for r in ROWS]
    rows[3]["image"] = None  # a null in a CSV cell
    pd.DataFrame(rows).to_csv(dataset_dir / "p.csv", index=False)
    with pytest.raises(DataError, match=r"record 3 has no image but record 0 has one"):
        load_pairs(dataset_dir / "p.csv")
    rows = [{k: v for k, v in r.items() if k != "image"} for r in ROWS]
    rows[2]["image"] = "img/2.png"
    with pytest.raises(DataError, match=r"record 2 has an image but record 0 has none"):
        load_pairs(write_jsonl(dataset_dir / "pairs.jsonl", rows))


@pytest.mark.parametrize("label", [2, -1, 0.5, "toxic", "yes", [1]])
def test_bad_label(dataset_dir, label):
    rows = [dict(r) for r in ROWS]
    rows[0]["label"] = label
    with pytest.raises(DataError, match="record 0: label must be 1 \\(toxic\\) or 0 \\(non-toxic\\)"):
        load_pairs(write_jsonl(dataset_dir / "pairs.jsonl", rows))


@pytest.mark.parametrize("label, want", [(True, 1), (False, 0), ("1", 1), (1.0, 1), ("0", 0)])
def test_label_spellings_accepted(dataset_dir, label, want):
    rows = [dict(r) for r in ROWS]
    rows[0]["label"] = label
    assert load_pairs(write_jsonl(dataset_dir / "pairs.jsonl", rows))[0].label == want


def test_empty_dataset(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    ds = load_pairs(path)
    assert len(ds) == 0
    with pytest.raises(DataError, match="empty"):
        ds.require_both_classes()
    with pytest.raises(DataError, match="empty"):
        load_pairs([]).require_both_classes()


@pytest.mark.parametrize("label", [0, 1])
def test_one_class_dataset(dataset_dir, label):
    rows = [dict(r, label=label) for r in ROWS]
    ds = load_pairs(write_jsonl(dataset_dir / "pairs.jsonl", rows))
    with pytest.raises(DataError, match=r"AUROC needs both classes, got (4 toxic and 0|0 toxic and 4) non-toxic"):
        ds.require_both_classes()


def test_both_classes_accepted(toy_pairs):
    toy_pairs.require_both_classes()  # raises on failure
    assert toy_pairs.counts()["toxic"] == toy_pairs.counts()["non_toxic"] == len(toy_pairs) // 2


def test_bad_sources(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_pairs(tmp_path / "nope.jsonl")
    (tmp_path / "pairs.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported data file type"):
        load_pairs(tmp_path / "pairs.txt")
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png"}\n{not json\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        load_pairs(tmp_path / "bad.jsonl")
    empty_dir = tmp_path / "d"
    empty_dir.mkdir()
    with pytest.raises(DataError, match="exactly one data file"):
        load_pairs(empty_dir)
    with pytest.raises(DataError, match="cannot read pairs from int"):
        load_pairs(3)


# ---------------------------------------------------------------- text-only records


TEXT_ROWS = [{k: v for k, v in r.items() if k != "image"} for r in ROWS]


def test_text_only_records_load_and_digest(tmp_path):
    ds = load_pairs(write_jsonl(tmp_path / "texts.jsonl", TEXT_ROWS))
    assert [p.image for p in ds] == [None] * 4 and ds.labels == [1, 0, 1, 0]
    assert [p.text for p in ds] == [r["text"] for r in ROWS]
    base = ds.digest()
    assert load_pairs(write_jsonl(tmp_path / "again.jsonl", TEXT_ROWS)).digest() == base
    changed = [dict(r) for r in TEXT_ROWS]
    changed[1]["label"] = 1
    assert load_pairs(write_jsonl(tmp_path / "b.jsonl", changed)).digest() != base
    changed = [dict(r) for r in TEXT_ROWS]
    changed[0]["text"] = "you stupid idiots"
    assert load_pairs(write_jsonl(tmp_path / "c.jsonl", changed)).digest() != base


def test_require_images(tmp_path, dataset_dir):
    texts = load_pairs(write_jsonl(tmp_path / "texts.jsonl", TEXT_ROWS))
    images = load_pairs(write_jsonl(dataset_dir / "pairs.jsonl", ROWS))
    texts.require_images(False, "x")
    images.require_images(True, "x")
    with pytest.raises(DataError, match=r"texts.jsonl: record 0 has no image, but because"):
        texts.require_images(True, "because")
    with pytest.raises(DataError, match=r"pairs.jsonl: record 0 has an image, but because"):
        images.require_images(False, "because")


@pytest.fixture(scope="module")
def text_tokenizer():
    from lmms_sgm.tiny import build_tokenizer

    return build_tokenizer(multimodal=False)


def test_text_only_records_are_plain_text_for_a_tokenizer(text_tokenizer):
    """A text-only model's records are its texts as they are (AurA): no chat template."""
    pair = Pair(image=None, text="you stupid idiot", label=1, question="what is this ?")
    assert data.plain_text(text_tokenizer)
    assert data.format_prompt(text_tokenizer, pair, "response") == "you stupid idiot"
    assert data.format_prompt(text_tokenizer, pair, "question") == "what is this ?"
    assert data.format_prompt(text_tokenizer, pair, "question+response") == "what is this ? you stupid idiot"
    assert data.prompt_prefix(text_tokenizer, pair) == "what is this ?"
    with pytest.raises(DataError, match="needs a 'question'"):
        data.format_prompt(text_tokenizer, Pair(None, "x", 0), "question")
    short, long = Pair(None, "ugly idiot", 1), Pair(None, "the picture shows a red circle", 0)
    enc = data.encode_batch(text_tokenizer, [short, long], "response")
    assert set(enc) == {"input_ids", "attention_mask"}
    assert enc["attention_mask"].tolist() == [[1, 1, 0, 0, 0, 0], [1] * 6]  # right padding
    assert text_tokenizer.convert_ids_to_tokens(enc["input_ids"][0, :2].tolist()) == ["ugly", "idiot"]


def test_text_only_records_use_the_mllm_chat_template_without_image(processor):
    pair = Pair(image=None, text="you stupid idiot", label=1, question="what is this ?")
    assert not data.plain_text(processor)
    assert data.format_prompt(processor, pair, "response") == "<s>USER: you stupid idiot "
    assert data.format_prompt(processor, pair, "question+response") == "<s>USER: what is this ? ASSISTANT: you stupid idiot </s> "
    enc = data.encode_batch(processor, [pair, Pair(None, "a red circle", 0)], "response")
    assert "pixel_values" not in enc
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert not (enc["input_ids"] == image_id).any()
