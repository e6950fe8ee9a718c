"""Write the fixtures of the local standard-format tasks (deterministic).

    python tasks/standard_local/make_sample.py        # rewrites tasks/standard_local/data/*.parquet
    python tasks/standard_local/make_sample.py DIR

A few records per benchmark, in the schema of its Hugging Face dataset (the one lmms-eval 0.7.3's
task loads), with PIL-drawn shapes as images, stored as parquet with the datasets features (so
image columns load as PIL images, as from the Hub):

- ``mme.parquet`` (lmms-lab/MME): question_id, image, question, answer (Yes/No), category; two
  questions per image (MME scores pairs), perception and cognition categories;
- ``pope.parquet`` (lmms-lab/POPE): id, question_id, question, answer (yes/no), image_source,
  image, category;
- ``scienceqa_img.parquet`` (lmms-lab/ScienceQA, ScienceQA-IMG) and ``scienceqa.parquet``
  (ScienceQA-FULL: image-less questions too): image, question, choices, answer (index), hint,
  task, grade, subject, topic, category, skill, lecture, solution;
- ``mmmu_val.parquet`` (MMMU validation): id, question, options (a Python list as a string),
  explanation, image_1..image_7, img_type, answer, topic_difficulty, question_type, subfield;
  ``<image k>`` placeholders in questions and options, one question with two images, one with
  image options, one open question;
- ``muirbench.parquet`` (MUIRBENCH/MUIRBENCH): idx, task, image_relation, image_type, question,
  options, answer, image_list (several images), counterpart_idx; ``<image>`` placeholders.
"""
from __future__ import annotations

import sys
from pathlib import Path

import datasets
from lmms_sgm_tasks.mm_toxic_qa.make_sample import draw_shapes

DATA = Path(__file__).resolve().parent / "data"
BG = (245, 245, 245)


def img(*shapes):
    return draw_shapes(list(shapes), BG)


def _write(rows: list[dict], features: dict, out: Path) -> Path:
    table = datasets.Dataset.from_list(rows, features=datasets.Features(features))
    table.to_parquet(str(out))
    return out


S = datasets.Value("string")
IMAGE = datasets.Image()


def mme(out: Path) -> Path:
    yn = " Please answer yes or no."
    rows = []
    for qid, category, image, questions in [
        (
            "existence/0001.png",
            "existence",
            img(("circle", "red")),
            [("Is there a circle in the image?", "Yes"), ("Is there a square in the image?", "No")],
        ),
        (
            "count/0002.png",
            "count",
            img(("circle", "red"), ("square", "blue")),
            [("Are there two shapes in the image?", "Yes"), ("Are there three shapes in the image?", "No")],
        ),
        (
            "color/0003.png",
            "color",
            img(("triangle", "yellow")),
            [("Is the triangle yellow?", "Yes"), ("Is the triangle green?", "No")],
        ),
        (
            "commonsense_reasoning/0004.png",
            "commonsense_reasoning",
            img(("square", "green"), ("square", "green")),
            [("Are the two shapes the same?", "Yes"), ("Is one shape larger than the other?", "No")],
        ),
    ]:
        for question, answer in questions:
            rows.append({"question_id": qid, "image": image, "question": question + yn, "answer": answer, "category": category})
    return _write(rows, {"question_id": S, "image": IMAGE, "question": S, "answer": S, "category": S}, out)


def pope(out: Path) -> Path:
    rows = []
    for i, (shapes, question, answer, category) in enumerate([
        ([("circle", "red")], "Is there a circle in the image?", "yes", "random"),
        ([("circle", "red")], "Is there a square in the image?", "no", "random"),
        ([("square", "blue"), ("triangle", "green")], "Is there a triangle in the image?", "yes", "popular"),
        ([("square", "blue"), ("triangle", "green")], "Is there a circle in the image?", "no", "popular"),
        ([("triangle", "yellow")], "Is there a yellow shape in the image?", "yes", "adversarial"),
        ([("triangle", "yellow")], "Is there a blue shape in the image?", "no", "adversarial"),
    ]):
        rows.append({"id": str(i), "question_id": str(i), "question": question, "answer": answer,
                     "image_source": f"shapes_{i // 2:03d}", "image": img(*shapes), "category": category})
    return _write(rows, {"id": S, "question_id": S, "question": S, "answer": S, "image_source": S, "image": IMAGE, "category": S}, out)


SQA_FEATURES = {"image": IMAGE, "question": S, "choices": datasets.Sequence(S), "answer": datasets.Value("int8"), "hint": S,
                "task": S, "grade": S, "subject": S, "topic": S, "category": S, "skill": S, "lecture": S, "solution": S}


def _sqa(image, question, choices, answer, hint=""):
    return {"image": image, "question": question, "choices": choices, "answer": answer, "hint": hint,
            "task": "closed choice", "grade": "grade3", "subject": "natural science", "topic": "shapes",
            "category": "Shapes", "skill": "Identify shapes", "lecture": "", "solution": ""}


SQA_IMG = [
    _sqa(img(("circle", "red")), "Which shape is shown?", ["square", "circle"], 1),
    _sqa(img(("square", "blue"), ("square", "blue")), "How many squares are there?", ["one", "two", "three"], 1,
         hint="The picture shows squares side by side."),
    _sqa(img(("triangle", "green")), "What colour is the triangle?", ["green", "red", "blue", "yellow"], 0),
    _sqa(img(("circle", "yellow")), "Which word describes the shape?", ["round", "pointed"], 0),
]
SQA_TEXT = [
    _sqa(None, "Which of these has three sides?", ["a triangle", "a circle"], 0),
    _sqa(None, "Which is a colour?", ["square", "blue", "two"], 1, hint="Colours name how things look."),
]


def scienceqa_img(out: Path) -> Path:
    return _write(SQA_IMG, SQA_FEATURES, out)


def scienceqa(out: Path) -> Path:
    """ScienceQA-FULL's layout: image-less questions between the others."""
    return _write([SQA_IMG[0], SQA_TEXT[0], SQA_IMG[1], SQA_TEXT[1]], SQA_FEATURES, out)


def mmmu(out: Path) -> Path:
    base = {"explanation": "", "topic_difficulty": "Easy", "img_type": "['Diagrams']"}
    rows = [
        {"id": "validation_Art_1", "question": "Which shape is drawn in <image 1>?", "options": "['circle', 'square', 'triangle']",
         "answer": "A", "question_type": "multiple-choice", "subfield": "Drawing", "image_1": img(("circle", "red"))},
        {"id": "validation_Math_2", "question": "How many shapes are in <image 1> and <image 2> together?",
         "options": "['2', '3', '4', '5']", "answer": "B", "question_type": "multiple-choice", "subfield": "Counting",
         "image_1": img(("square", "blue")), "image_2": img(("circle", "green"), ("triangle", "red"))},
        {"id": "validation_Physics_3", "question": "Which image shows a red shape?", "options": "['<image 1>', '<image 2>']",
         "answer": "B", "question_type": "multiple-choice", "subfield": "Optics",
         "image_1": img(("square", "blue")), "image_2": img(("circle", "red"))},
        {"id": "validation_Design_4", "question": "What colour is the shape in <image 1>?", "options": "[]", "answer": "yellow",
         "question_type": "open", "subfield": "Colour", "image_1": img(("triangle", "yellow"))},
    ]
    features = {"id": S, "question": S, "options": S, "explanation": S, **{f"image_{k}": IMAGE for k in range(1, 8)},
                "img_type": S, "answer": S, "topic_difficulty": S, "question_type": S, "subfield": S}
    rows = [{**base, **{f"image_{k}": None for k in range(1, 8)}, **r} for r in rows]
    return _write(rows, features, out)


def muirbench(out: Path) -> Path:
    rows = [
        {"idx": "0", "task": "Counting", "image_relation": "Independent", "image_type": "Drawing",
         "question": "Which image shows more shapes?", "options": ["The first image", "The second image"], "answer": "B",
         "image_list": [img(("circle", "red")), img(("square", "blue"), ("circle", "green"))], "counterpart_idx": "-1"},
        {"idx": "1", "task": "Image-Text Matching", "image_relation": "Similar", "image_type": "Drawing",
         "question": "Which of these images shows the same shape as <image>?", "options": ["<image>", "<image>"], "answer": "A",
         "image_list": [img(("triangle", "yellow")), img(("triangle", "green")), img(("square", "yellow"))], "counterpart_idx": "-1"},
        {"idx": "2", "task": "Counting", "image_relation": "Independent", "image_type": "Drawing",
         "question": "How many images show a circle?", "options": ["1", "2", "3"], "answer": "A",
         "image_list": [img(("circle", "red")), img(("square", "red"))], "counterpart_idx": "-1"},
        {"idx": "3", "task": "Image-Text Matching", "image_relation": "Similar", "image_type": "Drawing",
         "question": "Which image is blue?", "options": ["The first image", "The second image", "None of the choices provided"],
         "answer": "C", "image_list": [img(("square", "red")), img(("circle", "green"))], "counterpart_idx": "-1"},
    ]
    features = {"idx": S, "task": S, "image_relation": S, "image_type": S, "question": S, "options": datasets.Sequence(S),
                "answer": S, "image_list": datasets.Sequence(IMAGE), "counterpart_idx": S}
    return _write(rows, features, out)


WRITERS = {"mme": mme, "pope": pope, "scienceqa_img": scienceqa_img, "scienceqa": scienceqa, "mmmu_val": mmmu,
           "muirbench": muirbench}


def write_samples(out_dir: str | Path = DATA) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, writer in WRITERS.items():
        writer(out_dir / f"{name}.parquet")
    return out_dir


if __name__ == "__main__":
    print(write_samples(sys.argv[1] if len(sys.argv) > 1 else DATA))
