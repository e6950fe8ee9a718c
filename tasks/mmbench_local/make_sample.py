"""Write ``sample.tsv``, a tiny MMBench-format fixture (deterministic).

    python tasks/mmbench_local/make_sample.py            # rewrites tasks/mmbench_local/sample.tsv
    python tasks/mmbench_local/make_sample.py OUT.tsv

Seven rows in MMBench's own TSV layout (index, question, hint, A-D, answer, category, image as
base64 PNG, source, l2-category, comment, split) about PIL-drawn shapes: questions with and without
a hint, a three-option question, numeric option texts, and one circular-evaluation copy
(index 1000005: the options of row 5 rotated, its image given as a reference to row 5, as in
the official files).
"""
from __future__ import annotations

import base64
import io
import sys
from pathlib import Path

from lmms_sgm_tasks.mm_toxic_qa.make_sample import draw_shapes

COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source", "l2-category", "comment", "split"]
FP_S = "Fine-grained Perception (instance-level)"
FP_C = "Fine-grained Perception (cross-instance)"
CP = "Coarse Perception"

# index, question, hint, options, answer, category, l2-category, shapes
ROWS = [
    (
        0,
        "What colour is the shape?",
        None,
        ["red", "green", "blue", "yellow"],
        "A",
        "attribute_recognition",
        FP_S,
        [("circle", "red")],
    ),
    (
        1,
        "Which shape is shown in the image?",
        None,
        ["circle", "square", "triangle"],
        "B",
        "attribute_recognition",
        FP_S,
        [("square", "blue")],
    ),
    (
        2,
        "How many shapes are in the image?",
        None,
        ["1", "2", "3", "4"],
        "C",
        "image_scene",
        CP,
        [("circle", "green"), ("square", "red"), ("triangle", "blue")],
    ),
    (
        3,
        "Which shape is on the left?",
        "The image shows two shapes side by side.",
        ["square", "circle", "triangle", "cross"],
        "B",
        "spatial_relationship",
        FP_C,
        [("circle", "red"), ("square", "blue")],
    ),
    (
        4,
        "What colour is the triangle?",
        "Look at the only shape in the picture.",
        ["red", "green", "blue", "yellow"],
        "D",
        "attribute_recognition",
        FP_S,
        [("triangle", "yellow")],
    ),
    (
        5,
        "Which colour is NOT in the image?",
        None,
        ["red", "green", "blue"],
        "C",
        "attribute_comparison",
        FP_C,
        [("circle", "red"), ("square", "green")],
    ),
]
# Circular copy of row 5: options rotated by one (A<-B, B<-C, C<-A), so the answer moves to B.
CIRCULAR = (1000005, 5, ["green", "blue", "red"], "B")


def _b64_png(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_sample(out: str | Path) -> Path:
    out = Path(out)
    lines = ["\t".join(COLUMNS)]
    base = {}
    for index, question, hint, options, answer, category, l2, shapes in ROWS:
        row = {
            "index": str(index), "question": question, "hint": hint or "", "answer": answer, "category": category,
            "image": _b64_png(draw_shapes(shapes, (245, 245, 245))), "source": "lmms_sgm_sample", "l2-category": l2,
            "comment": "", "split": "dev",
        }
        row.update(zip("ABCD", options))
        base[index] = row
        lines.append("\t".join(row.get(c, "") for c in COLUMNS))
    index, of, options, answer = CIRCULAR
    row = {**base[of], "index": str(index), "answer": answer, "image": str(of), "D": ""}
    row.update(zip("ABCD", options))
    lines.append("\t".join(row.get(c, "") for c in COLUMNS))
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


if __name__ == "__main__":
    print(write_sample(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent / "sample.tsv"))
