"""The recipe presets equal the tables of docs/recipes.md, number for number, both ways."""

import json
import re
from pathlib import Path

import pytest

from cmt_core.cli import main
from cmt_core.presets import PRESETS, get_preset

RECIPES = ("cifar10", "ffhq64", "afhq64", "imagenet64", "imagenet512", "imagenet256-meanflow")
DOC = Path(__file__).resolve().parents[1] / "docs" / "recipes.md"
ROW_HEADER = ["stage", "field", "value", "status", "reference", "source"]
BUDGET_HEADER = ["stage", "iterations", "batch", "Mimg", "source"]
BUDGET_STAGES = {"teacher": "teacher", "mid-training": "midtrain", "post-training": "posttrain"}

# What a preset sets that is not part of a recipe: where files are, batch sizes for speed, bookkeeping.
OPERATIONAL = {"data.path", "data.encoder.path", "data.encoder.edm2_encoded", "teacher.path", "guidance.guide.path",
               "midtrain.lpips_backbone", "rollout.batch_size", "rollout.store", "eval.batch_size"}
BOOKKEEPING = {"checkpoint_every", "log_every"}


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _literal(cell: str):
    """A table value: `4096.0`, `2e-4`, `[2, 2, 2]`, `null`, `true` as JSON, anything else as a string."""
    text = cell.strip("`")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def read_tables(text: str) -> dict[str, dict[str, list[dict]]]:
    """``{recipe: {"rows": [...], "budget": [...]}}`` from the ``## `name` `` sections, each row a dict keyed
    by its table's header."""
    tables, recipe, header = {}, None, None
    for line in text.splitlines():
        if line.startswith("## `"):
            recipe, header = line.split("`")[1], None
            tables[recipe] = {"rows": [], "budget": []}
        elif recipe and line.startswith("|"):
            cells = _cells(line)
            if header is None:
                header = cells
                assert header in (ROW_HEADER, BUDGET_HEADER), f"{recipe}: unknown table header {header}"
            elif not set(line) <= set("|- "):
                assert len(cells) == len(header), f"{recipe}: a row has {len(cells)} cells, not {len(header)}: {line}"
                tables[recipe]["rows" if header == ROW_HEADER else "budget"].append(dict(zip(header, cells)))
        else:
            header = None
    return tables


TABLES = read_tables(DOC.read_text())


def _value(dumped: dict, field: str):
    for key in field.split("."):
        if not isinstance(dumped, dict) or key not in dumped:
            raise KeyError(field)
        dumped = dumped[key]
    return dumped


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


def _field_rows(name: str) -> list[dict]:
    return [row for row in TABLES[name]["rows"] if row["field"] != "—"]


def _leaves(raw: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in raw.items():
        path = prefix + key
        if isinstance(value, dict):
            out += _leaves(value, path + ".")
        else:
            out.append(path)
    return out


def test_the_doc_has_a_table_and_a_budget_for_every_recipe():
    assert set(TABLES) == set(RECIPES)
    for name in RECIPES:
        assert _field_rows(name) and len(TABLES[name]["budget"]) == 4, name


@pytest.mark.parametrize("name", RECIPES)
def test_every_number_of_the_recipe_table_equals_the_preset(name):
    dumped = get_preset(name).model_dump(mode="json")
    wrong = []
    for row in _field_rows(name):
        field, want = row["field"].strip("`"), _literal(row["value"])
        try:
            have = _value(dumped, field)
        except KeyError:
            wrong.append(f"{field}: not a config field")
            continue
        if not _same(have, want):
            wrong.append(f"{field}: preset {have!r}, docs/recipes.md {want!r}")
    assert not wrong, f"preset {name!r} differs from docs/recipes.md:\n  " + "\n  ".join(wrong)


@pytest.mark.parametrize("name", RECIPES)
def test_every_setting_of_the_preset_is_in_the_recipe_table(name):
    listed = {row["field"].strip("`") for row in _field_rows(name)}
    unlisted = [path for path in _leaves(PRESETS[name]())
                if path not in listed and path.split(".")[-1] not in BOOKKEEPING
                and not any(path == op or path.startswith(op + ".") for op in OPERATIONAL)]
    assert not unlisted, f"preset {name!r} sets fields docs/recipes.md does not list: {unlisted}"


@pytest.mark.parametrize("name", RECIPES)
def test_the_budget_table_is_steps_times_batch(name):
    cfg = get_preset(name)
    rows = {row["stage"]: row for row in TABLES[name]["budget"]}
    mimg = {}
    for stage, section in BUDGET_STAGES.items():
        train = getattr(cfg, section).train
        row = rows[stage]
        assert (int(row["iterations"]), int(row["batch"])) == (train.steps, train.batch_size), f"{name}: {stage}"
        mimg[stage] = train.steps * train.batch_size / 1e6
        assert float(row["Mimg"]) == pytest.approx(mimg[stage]), f"{name}: {stage}"
    assert float(rows["mid + post"]["Mimg"]) == pytest.approx(mimg["mid-training"] + mimg["post-training"])


def test_cmt_config_prints_the_mimg_budget_of_each_stage(capsys):
    assert main(["config", "--preset", "cifar10"]) == 0  # EDM's released teacher: not trained here
    printed = capsys.readouterr().out
    budget = dict(re.findall(r"^# ([a-z +-]+):\s+([\d.]+) Mimg", printed, re.MULTILINE))
    assert budget == {"mid-training": "38.4", "post-training": "12.8", "mid + post": "51.2"}
    assert "# teacher: not trained here (teacher.source=edm_pickle)" in printed
    assert main(["config", "--preset", "cifar10", "--set", "teacher.source=pretrain"]) == 0
    budget = dict(re.findall(r"^# ([a-z +-]+):\s+([\d.]+) Mimg", capsys.readouterr().out, re.MULTILINE))
    assert budget == {"teacher": "200", "mid-training": "38.4", "post-training": "12.8", "mid + post": "51.2"}
