"""Leakage-free splits: grouping by image and normalised question, templates, stratified shares,
where a group may go, reproducibility."""
from __future__ import annotations

from collections import Counter

import pytest

from lmms_sgm.datasets.splits import Item, assign, normalise_question, parse_fractions, template_questions


def item(i, category="a", images=None, questions=None, profile=True, evaluate=True):
    """An Item as the builder makes it (questions normalised)."""
    questions = questions if questions is not None else [f"question {i}"]
    return Item(id=f"r{i}", category=category, images=tuple(images if images is not None else [f"img{i}"]),
                questions=tuple(normalise_question(q) for q in questions),
                can_profile=profile, can_eval=evaluate)


def test_normalised_questions_ignore_case_punctuation_articles_and_spacing():
    assert normalise_question("How do I pick a lock?") == normalise_question("  how do i pick   LOCK ") == "how do i pick lock"
    assert normalise_question("Ｈow ｄo I pick the lock！") == "how do i pick lock"  # NFKC: full-width forms
    assert normalise_question("pick_a lock") == "pick lock"
    assert normalise_question("How do I pick a lock") != normalise_question("How do I pick a key")
    assert normalise_question(None) == ""


def test_fractions():
    assert parse_fractions("3,1,1") == (0.6, 0.2, 0.2)
    for bad in ("0.5,0.5", "a,b,c", "-1,1,1", "0,0,0"):
        with pytest.raises(ValueError, match="three non-negative shares"):
            parse_fractions(bad)


def test_exact_shares_per_category():
    """50 independent records in each of two categories: exactly 30 / 10 / 10 of each."""
    items = [item(i, category="a" if i < 50 else "b") for i in range(100)]
    plan = assign(items, seed=3)
    for cat in "ab":
        got = Counter(s for it, s in zip(items, plan.split_of) if it.category == cat)
        assert got == {"profile": 30, "validation": 10, "test": 10}


def test_records_sharing_an_image_or_question_stay_together():
    items = [item(i) for i in range(40)]
    items[3] = item(3, images=["img7"])  # shares record 7's image
    items[11] = item(11, questions=["QUESTION 25!"])  # record 25's question, differently written
    items[12] = item(12, images=["img12", "img30"])  # an attack image shared with record 30
    for seed in range(20):
        plan = assign(items, seed=seed)
        assert plan.split_of[3] == plan.split_of[7]
        assert plan.split_of[11] == plan.split_of[25]
        assert plan.split_of[12] == plan.split_of[30]
        assert plan.group_of[3] == plan.group_of[7] and plan.group_of[3] != plan.group_of[4]


def test_template_questions_link_nothing():
    """A question asked about many images ("Describe the image.") is not content: no group."""
    items = [item(i, questions=["Describe the image."]) for i in range(30)]
    assert template_questions(items, 8) == {"describe image": 30}
    plan = assign(items, seed=0, template_min=8)
    assert len(plan.groups) == 30
    assert Counter(plan.split_of) == {"profile": 18, "validation": 6, "test": 6}
    # Below the threshold the same question links every record into one group.
    assert len(assign(items, seed=0, template_min=31).groups) == 1


def test_a_question_on_exactly_template_min_distinct_images_is_a_template():
    """The threshold is inclusive and counts distinct images: 8 images at template_min=8 make a
    template (8 groups); 7 do not, nor do 8 records on 7 images (each links everything)."""
    on_8 = [item(i, questions=["Describe the image."]) for i in range(8)]
    on_7 = on_8[:7]
    on_7_twice = [*on_7, item(8, images=["img3"], questions=["describe image"])]
    assert template_questions(on_8, 8) == {"describe image": 8}
    assert template_questions(on_7, 8) == template_questions(on_7_twice, 8) == {}
    assert len(assign(on_8, seed=0, template_min=8).groups) == 8
    assert len(assign(on_7, seed=0, template_min=8).groups) == 1
    assert len(assign(on_7_twice, seed=0, template_min=8).groups) == 1
    assert len(assign(on_7_twice, seed=0, template_min=7).groups) == 7  # a template at 7; img3 still links two


def test_a_group_goes_only_where_it_has_something_to_give():
    items = [item(i, category="x", profile=False) for i in range(20)] + [item(20 + i, category="x", evaluate=False) for i in range(10)]
    plan = assign(items, seed=1)
    assert Counter(plan.split_of[:20]) == {"validation": 10, "test": 10}  # prompts only: 50/50
    assert set(plan.split_of[20:]) == {"profile"}  # pairs only


def test_a_share_of_zero_takes_nothing():
    items = [item(i, profile=False) for i in range(10)] + [item(10 + i, evaluate=False) for i in range(10)]
    plan = assign(items, fractions="0,1,1", seed=0)
    assert Counter(plan.split_of) == {"validation": 5, "test": 5, "unused": 10}
    assert Counter(assign(items, fractions="1,0,0", seed=0).split_of) == {"profile": 10, "unused": 10}


def test_small_strata_still_fill_the_test_split():
    """Ten categories of two records each: the build-wide share breaks ties, so test is not starved."""
    items = [item(i, category=f"c{i // 2}", profile=False) for i in range(20)]
    assert Counter(assign(items, seed=0).split_of) == {"validation": 10, "test": 10}


def test_same_seed_same_split_other_seed_other_split():
    items = [item(i, category="abc"[i % 3]) for i in range(90)]
    a, b, c = assign(items, seed=5), assign(items, seed=5), assign(items, seed=6)
    assert a.split_of == b.split_of
    assert a.split_of != c.split_of
    assert Counter(a.split_of) == Counter(c.split_of)  # the same shares, other records


def test_oversized_group_is_reported():
    """14 of 20 records share an image: more than the profile share (12) can take."""
    items = [item(i, images=["shared"] if i < 14 else None) for i in range(20)]
    plan = assign(items, seed=0)
    assert [g["records"] for g in plan.oversized] == [14]
    assert plan.oversized[0]["shared_keys"] == ["image shared (14 records)"]
    assert not assign([item(i, images=["shared"] if i < 12 else None) for i in range(20)], seed=0).oversized
