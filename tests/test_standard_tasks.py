"""The local standard-format tasks (tasks/standard_local) against lmms-eval's own tasks.

Each of our tasks is compared with lmms-eval 0.7.3's built-in task of the same benchmark, loaded
from lmms-eval's own YAML with only its dataset replaced by our fixture: same documents, prompts,
images and targets, and, through lmms-eval's evaluator with a model that gives both the same
answers, the same metrics."""
from __future__ import annotations

from pathlib import Path

import datasets
import pytest
from lmms_sgm_tasks.standard_local import make_sample

TASKS_DIR = Path(make_sample.__file__).resolve().parent
# our task -> (lmms-eval's YAML, split, fixture, canned answers by doc: every scoring branch)
CASES = {
    "mme_local": ("mme/mme.yaml", "test", "mme.parquet",
                  ["Yes", "no.", "yes", "Yes, there are three.", "y", "n", "maybe", "No"]),
    "pope_local": ("pope/pope.yaml", "test", "pope.parquet", ["yes", "No", "yes it is", "no", "Yes.", "no"]),
    "scienceqa_img_local": ("scienceqa/scienceqa_img.yaml", "test", "scienceqa_img.parquet", ["B", "A. one", "b", "The answer is A"]),
    "scienceqa_local": ("scienceqa/scienceqa.yaml", "test", "scienceqa.parquet", ["B", "A", "B.", "b"]),
    "mmmu_val_local": ("mmmu/mmmu_val.yaml", "validation", "mmmu_val.parquet", ["A", "(C) 4", "The answer is B", "yellow"]),
    "muirbench_local": ("muirbench/muirbench.yaml", "test", "muirbench.parquet",
                        ["B. The second image", "A", "I think C", "C. None of the choices provided"]),
}


@pytest.fixture(scope="module")
def task_manager(tmp_path_factory):
    from lmms_eval.api import task as task_module
    from lmms_eval.tasks import TaskManager

    from lmms_sgm.lmms import registration

    mp = pytest.MonkeyPatch()
    mp.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets")))
    task_module._resolve_hf_datasets_cache_dir.cache_clear()
    registration.manifests()
    yield TaskManager()
    mp.undo()
    task_module._resolve_hf_datasets_cache_dir.cache_clear()


def builtin_config(name: str) -> dict:
    """lmms-eval's own YAML for the benchmark ``name`` mirrors, its dataset replaced by our fixture."""
    import lmms_eval.tasks
    from lmms_eval import utils

    yaml, split, fixture, _ = CASES[name]
    config = utils.load_yaml_config(str(Path(lmms_eval.tasks.__file__).parent / yaml))
    config.pop("dataset_name", None)
    config.pop("tag", None)
    config.update(task=f"builtin_{name}", dataset_path="parquet", test_split=split,
                  dataset_kwargs={"data_files": {split: str(TASKS_DIR / "data" / fixture)}})
    return config


def builtin_task(name: str):
    from lmms_eval.api.task import ConfigurableTask

    return ConfigurableTask(config=builtin_config(name))


class Canned:
    """A stand-in model (built lazily: lmms-eval's base class) answering by document."""

    @staticmethod
    def make(answers_by_task):
        from lmms_eval.api.model import lmms

        class _Canned(lmms):
            is_simple = True

            def generate_until(self, requests):
                out = []
                for r in requests:
                    _, _, doc_to_visual, doc_id, task, split = r.args
                    doc_to_visual(self.task_dict[task][split][doc_id])  # the visuals load
                    out.append(answers_by_task[task][doc_id])
                return out

            def loglikelihood(self, requests):
                raise NotImplementedError

            def generate_until_multi_round(self, requests):
                raise NotImplementedError

        return _Canned()


@pytest.fixture(scope="module")
def loaded(task_manager):
    from lmms_eval.tasks import get_task_dict

    ours = get_task_dict(list(CASES), task_manager)
    theirs = {f"builtin_{name}": builtin_task(name) for name in CASES}
    return ours, theirs


def _docs(task):
    return task.test_docs() if task.has_test_docs() else task.validation_docs()


@pytest.mark.parametrize("name", list(CASES))
def test_documents_prompts_images_and_targets_are_lmms_evals(name, loaded):
    ours, theirs = loaded[0][name], loaded[1][f"builtin_{name}"]
    a, b = _docs(ours), _docs(theirs)
    assert len(a) == len(b) == len(CASES[name][3])
    for x, y in zip(a, b):
        assert ours.doc_to_text(x) == theirs.doc_to_text(y)
        assert ours.doc_to_target(x) == theirs.doc_to_target(y)
        va, vb = ours.doc_to_visual(x), theirs.doc_to_visual(y)
        assert [v.tobytes() for v in va] == [v.tobytes() for v in vb]
    assert ours.config.generation_kwargs == theirs.config.generation_kwargs


def test_the_fixtures_exercise_the_request_shapes(loaded):
    """What the tasks send the model: several images, none, <image k> and <image> placeholders."""
    ours = loaded[0]
    visuals = {name: [len(ours[name].doc_to_visual(d)) for d in _docs(ours[name])] for name in CASES}
    texts = {name: [ours[name].doc_to_text(d) for d in _docs(ours[name])] for name in CASES}
    assert 0 in visuals["scienceqa_local"] and max(visuals["muirbench_local"]) == 3 and max(visuals["mmmu_val_local"]) == 2
    assert any("<image 2>" in t for t in texts["mmmu_val_local"])
    assert any(t.count("<image>") == 3 for t in texts["muirbench_local"])


def test_scores_equal_lmms_evals_own_on_the_same_answers(task_manager):
    """lmms-eval's evaluator, our tasks and its own (on the same fixtures), one set of answers."""
    from lmms_eval import evaluator

    answers = {}
    for name, (_, _, _, canned) in CASES.items():
        answers[name] = answers[f"builtin_{name}"] = canned
    tasks = list(CASES) + [builtin_task(name) for name in CASES]
    results = evaluator.simple_evaluate(model=Canned.make(answers), tasks=tasks, task_manager=task_manager)["results"]
    for name in CASES:
        ours = {k: v for k, v in results[name].items() if k != "alias"}
        theirs = {k: v for k, v in results[f"builtin_{name}"].items() if k != "alias"}
        assert ours == theirs, name
    # The answers reach every branch: neither all right nor all wrong.
    assert 0 < results["mme_local"]["mme_perception_score,none"] < 3 * 200
    assert 0 < results["pope_local"]["pope_accuracy,none"] < 1
    assert 0 < results["scienceqa_img_local"]["exact_match,none"] < 1
    assert 0 < results["mmmu_val_local"]["mmmu_acc,none"] < 1
    assert 0 < results["muirbench_local"]["muirbench_score_overall,flexible-extract"] < 1


def test_shipped_fixtures_are_what_make_sample_writes(tmp_path):
    out = make_sample.write_samples(tmp_path)
    for name in make_sample.WRITERS:
        fresh = datasets.Dataset.from_parquet(str(out / f"{name}.parquet"))
        shipped = datasets.Dataset.from_parquet(str(TASKS_DIR / "data" / f"{name}.parquet"))
        assert fresh.features == shipped.features and len(fresh) == len(shipped)
        for x, y in zip(fresh, shipped):  # pixels, not PNG bytes (zlib builds differ)
            for key in x:
                values = (x[key], y[key]) if isinstance(x[key], list) else ([x[key]], [y[key]])
                assert [v.tobytes() if hasattr(v, "tobytes") else v for v in values[0]] == \
                       [v.tobytes() if hasattr(v, "tobytes") else v for v in values[1]], (name, key)
