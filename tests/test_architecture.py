"""The shape of the code: imports form a DAG pointing one way, and the stage graph derives from one declaration."""

from __future__ import annotations

import ast
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from cmt_core.config import PipelineConfig
from cmt_core.presets import PRESETS, get_preset
from cmt_core.stages import STAGES, plan

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cmt_core", "tasks", "flows")
LAYER = {"cmt_core": 0, "tasks": 1, "flows": 2}  # orchestration -> stages -> method: imports point down
# the extras' modules: never imported at module level in cmt_core
OPTIONAL = ("prefect", "dask", "distributed", "cleanfid", "torchvision", "scipy", "lpips", "tensorboard", "diffusers")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imports(path: Path, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(first-party modules imported anywhere in the file, third-party top-level names imported at module level)."""
    tree = ast.parse(path.read_text())
    first, top_level = set(), set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        for name in names:
            if name.split(".")[0] in PACKAGES:
                first.add(name)
    for node in tree.body:  # module level only: what importing the module costs
        if isinstance(node, ast.Import):
            top_level |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            top_level.add(node.module.split(".")[0])
    return first, top_level


def test_imports_form_a_dag_that_points_from_orchestration_to_the_method():
    modules = all_modules()
    graph = {name: imports(path, modules)[0] - {name} for name, path in modules.items()}
    for name, deps in graph.items():
        for dep in deps:
            assert dep in modules, f"{name} imports {dep}, which is not a module of this project"
            assert LAYER[dep.split(".")[0]] <= LAYER[name.split(".")[0]], f"{name} imports {dep} (upwards)"
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", "import cycle: " + " -> ".join(trail[trail.index(node):] + [node])
        state[node] = "open"
        for dep in sorted(graph[node]):
            visit(dep, trail + [node])
        state[node] = "done"

    for name in sorted(graph):
        visit(name, [])


# the code a config configures: it takes plain values and never imports a config type
CONFIGURED = ("cmt_core.objectives", "cmt_core.networks", "cmt_core.models", "cmt_core.preconditioning",
              "cmt_core.samplers", "cmt_core.solvers", "cmt_core.training", "cmt_core.data", "cmt_core.trajectories",
              "cmt_core.evaluation", "cmt_core.teachers", "cmt_core.encoders", "cmt_core.conditioning",
              "cmt_core.methods", "cmt_core.engine")


def test_the_config_sits_above_the_code_it_configures():
    modules = all_modules()
    for name, path in modules.items():
        if name.startswith(CONFIGURED):
            assert "cmt_core.config" not in imports(path, modules)[0], f"{name} imports the config schema"
    below = set().union(*(imports(path, modules)[0] for name, path in modules.items()
                          if name.startswith("cmt_core.config")))
    assert not {m for m in below if m.startswith(("cmt_core.objectives", "cmt_core.networks", "cmt_core.training",
                                                  "cmt_core.preconditioning", "cmt_core.models"))}
    assert "cmt_core.methods" in below  # its choices and rules come from the method registry


def test_the_library_imports_no_optional_extra_at_module_level():
    modules = all_modules()
    for name, path in modules.items():
        if name.startswith("cmt_core"):
            _, top_level = imports(path, modules)
            assert not top_level & set(OPTIONAL), f"{name} imports {sorted(top_level & set(OPTIONAL))} at module level"


# --- the stage graph ---------------------------------------------------------------------------------------------

def leaf_fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted paths of every leaf field of a pydantic model class."""
    out = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out += leaf_fields(annotation, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


def get(obj, path: str):
    for key in path.split("."):
        obj = getattr(obj, key)
    return obj


TRAINED = ("teacher", "guidance.guide", "midtrain", "posttrain")  # the sections with a TrainConfig
# Fields whose generic change would break a cross-field rule of the base config: a valid alternative set.
SPECIAL = {
    "teacher.source": {"teacher.source": "checkpoint", "teacher.path": "teacher.pt"},
    "teacher.path": {"teacher.source": "checkpoint", "teacher.path": "elsewhere.pt"},
    "teacher.target": {"teacher.source": "callable", "teacher.target": "pkg.mod:make", "teacher.allow_code": True,
                       "midtrain.init": "random"},  # a callable teacher has no weights to initialise from
    "precision": {"precision": "bf16"},
    "launch.nodes": {"launch.nodes": 2, "launch.rdzv_endpoint": "node0:29500"},
    "launch.rdzv_endpoint": {"launch.rdzv_endpoint": "node1:29500"},
    "launch.rdzv_id": {"launch.rdzv_id": "job-2"},  # 'fp32' is what 'auto' is on CPU: the same precision
    "rollout.solver.sigma_min": {"rollout.solver.sigma_min": 0.004},
    "rollout.solver.sigma_max": {"rollout.solver.sigma_max": 40.0},
    # the CMT boundary (posttrain.ect.anchor_sigma) keeps a mid-trained consistency model's map: off for the others
    "midtrain.form": {"midtrain.form": "flow_map", "posttrain.init": "teacher", "posttrain.ect.anchor_sigma": 0.0},
    "posttrain.method": {"posttrain.method": "meanflow", "midtrain.form": "mf", "posttrain.ect.anchor_sigma": 0.0},
    "posttrain.init": {"posttrain.init": "teacher", "posttrain.ect.anchor_sigma": 0.0},
    "network.kind": {"network.kind": "unet"},
    "guidance.guide.source": {"guidance.guide.source": "checkpoint", "guidance.guide.path": "guide.pt"},
    # the teacher samples with Heun, which has no lower_order_final: a multistep sampler that has it
    "teacher.sampler.lower_order_final": {"teacher.sampler.name": "dpm3m", "teacher.sampler.lower_order_final": True},
    **{f"{s}.train.lr_decay_steps": {f"{s}.train.lr_schedule": "rsqrt", f"{s}.train.lr_decay_steps": 7}
       for s in TRAINED},
    # an early end is checked at evaluations
    **{f"{s}.train.until_below": {f"{s}.train.eval_every": 10, f"{s}.train.until_below": {"score_2step": 0.5}}
       for s in TRAINED},
    # a trained encoder's network: GroupNorm groups must divide the widths
    "data.encoder.autoencoder.norm_groups": {"data.encoder.kind": "trained", "data.encoder.autoencoder.norm_groups": 4},
    "data.encoder.autoencoder.widths": {"data.encoder.kind": "trained", "data.encoder.autoencoder.widths": [16, 32]},
    "data.encoder.raw_mean": {"data.encoder.kind": "trained", "data.encoder.raw_mean": [0.0] * 4,
                              "data.encoder.raw_std": [1.0] * 4},
    "data.encoder.raw_std": {"data.encoder.kind": "trained", "data.encoder.raw_mean": [0.0] * 4,
                             "data.encoder.raw_std": [2.0] * 4},
    "data.encoder.path": {"data.encoder.kind": "sd_vae", "data.encoder.path": "vae"},
    "data.encoder.edm2_encoded": {"data.encoder.kind": "sd_vae", "data.encoder.path": "vae",
                                  "data.encoder.edm2_encoded": "latents.zip"},
    # the power-function EMA's fields take effect together
    **{f"{s}.train.ema_stds": {f"{s}.train.ema_stds": [0.05, 0.1]} for s in TRAINED},
    **{f"{s}.train.ema_snapshot_every": {f"{s}.train.ema_stds": [0.05, 0.1], f"{s}.train.ema_snapshot_every": 10}
       for s in TRAINED},
    **{f"{s}.train.posthoc_std": {f"{s}.train.ema_stds": [0.05, 0.1], f"{s}.train.ema_snapshot_every": 10,
                                  f"{s}.train.posthoc_std": 0.07} for s in TRAINED},
}


def changed(value, annotation):
    """A different value of a field's type (a list of candidates for floats, whose ranges differ)."""
    if isinstance(value, bool):
        return not value
    if typing.get_origin(annotation) is typing.Literal:
        return next(c for c in typing.get_args(annotation) if c != value)
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return [value * 0.5, value * 1.5, value + 0.1] if value else [0.1]
    if isinstance(value, tuple) and value and isinstance(value[0], float):  # e.g. Adam's betas: same length
        return (value[0] * 0.5, *value[1:])
    if isinstance(value, tuple):
        return value[:-1] if len(value) > 1 else (value + value if value else (16,))
    if value is None:  # optional fields: a value of the non-None type
        kind = next(a for a in typing.get_args(annotation) if a is not type(None))
        return {int: 7, float: 0.5}.get(kind, (0, 2) if typing.get_origin(kind) is tuple else "x.pt")
    if isinstance(value, (str, Path)):
        return type(value)(f"{value}-other")
    raise TypeError(f"no alternative for {value!r}")


def field_annotation(path: str):
    model, parts = PipelineConfig, path.split(".")
    for key in parts[:-1]:
        model = model.model_fields[key].annotation
    return model.model_fields[parts[-1]].annotation


def readers(path: str) -> set[str]:
    return {name for name, s in STAGES.items()
            if any(path == r or path.startswith(r + ".") for r in s.reads)}


def dependants(cfg, stages: set[str]) -> set[str]:
    return {name for name in STAGES if set(plan(cfg).needed([name])) & stages}


CONDITIONAL = ("teacher.train.label_dropout", "midtrain.train.label_dropout", "posttrain.train.label_dropout",
               "guidance.guide.train.label_dropout", "guidance.kind", "guidance.scale", "guidance.rollout_scale",
               "guidance.sweep")


def special(base: PipelineConfig, path: str) -> dict | None:
    """``SPECIAL``, plus the data fields, whose valid alternatives depend on the preset's kind of data, and the
    fields that need class-conditional data (label dropout, guidance: autoguidance, which any teacher takes)."""
    points = base.data.name in ("gaussian_mixture", "checkerboard")
    if path in CONDITIONAL:
        value = {"label_dropout": 0.1, "kind": "autoguidance", "scale": 2.0, "rollout_scale": 2.0, "sweep": [2.0]}
        guided = {"guidance.kind": "autoguidance"} if path.startswith("guidance.") else {}
        return {"data.num_classes": 4 if points else 10, **guided, path: value[path.split(".")[-1]]}
    if path == "network.kind" and points:
        return {}  # 2-D data has one network kind; the image presets cover this field
    if path in ("network.patch_size", "network.heads"):  # read once the network is a DiT (images only)
        return {} if points else {"network.kind": "dit", path: {"patch_size": 4, "heads": 8}[path.split(".")[-1]]}
    if path.startswith("posttrain.meanflow.guidance."):  # read once guidance is on: classes, dropout, Mean Flow
        value = {"omega": 0.5, "kappa": 0.2, "t_start": 0.1, "t_end": 0.9}[path.split(".")[-1]]
        return {"data.num_classes": 4 if points else 10, "posttrain.method": "meanflow", "midtrain.form": "flow_map",
                "posttrain.train.label_dropout": 0.1, "posttrain.ect.anchor_sigma": 0.0,
                "posttrain.meanflow.guidance.omega": 0.5, path: value}
    if path.startswith("data.encoder."):  # a latent space: images only; its fields are read once it is not the identity
        if points:
            return {}
        if path in SPECIAL:
            return SPECIAL[path]
        kind = {"data.encoder.kind": "trained"}
        return kind if path == "data.encoder.kind" else {**kind, path: _valid(base, path, kind)}
    if path in ("data.name", "data.path"):
        if points:
            return {"data.name": "checkerboard"} if path == "data.name" else {"data.path": "unused.npz"}
        return {"data.name": "image_folder", "data.path": "images"}
    return SPECIAL.get(path)


def _valid(base: PipelineConfig, path: str, together: dict):
    """A changed value of ``path`` that is valid beside the values ``together``."""
    candidates = changed(get(base, path), field_annotation(path))
    for value in candidates if isinstance(candidates, list) else [candidates]:
        try:
            with_values(base, {**together, path: value})
            return value
        except ValueError:
            continue
    raise AssertionError(f"no valid alternative value for {path}")


def with_values(base: PipelineConfig, updates: dict) -> PipelineConfig:
    raw = base.model_dump(mode="json")
    for dotted, value in updates.items():
        node = raw
        *parents, last = dotted.split(".")
        for key in parents:
            node = node[key]
        node[last] = list(value) if isinstance(value, tuple) else (str(value) if isinstance(value, Path) else value)
    return PipelineConfig.model_validate(raw)


def variant(base: PipelineConfig, path: str) -> PipelineConfig:
    together = special(base, path)
    if together:
        return with_values(base, together)
    candidates = changed(get(base, path), field_annotation(path))
    for value in candidates if isinstance(candidates, list) else [candidates]:
        try:
            return with_values(base, {path: value})
        except ValueError:
            continue
    raise AssertionError(f"no valid alternative value for {path}")


@pytest.mark.parametrize("preset", ["toy", "digits"])
def test_changing_a_field_changes_the_ids_of_exactly_the_stages_that_read_it_and_their_dependants(preset):
    base = get_preset(preset)
    ids = plan(base).ids
    unread = []
    for path in leaf_fields(PipelineConfig):
        if special(base, path) == {}:
            continue
        other = variant(base, path)
        together = special(base, path)
        if together:  # several fields change together: every one of them is read
            touched = set().union(*(readers(p) for p in together))
        else:
            touched = readers(path)
        expected = dependants(base, touched) | dependants(other, touched)
        new_ids = plan(other).ids
        actual = {s for s in STAGES if new_ids[s] != ids[s]}
        assert actual == expected, f"{path}: ids changed for {sorted(actual)}, declared readers give {sorted(expected)}"
        if not touched:
            unread.append(path)
    # what no stage reads is orchestration (where files live, which device, the dask cluster, the label), what
    # steers evaluations during training, which the teacher's training does not run, and the permission to run
    # a callable teacher's code (checked when the config is made), and how training processes are laid out
    assert sorted(unread) == sorted(["preset", "device", "cpu_threads", "artifact_root", "cache_root",
                                     "rollout.cluster.address", "rollout.cluster.workers",
                                     "rollout.cluster.threads_per_worker", "rollout.cluster.gpu_resource",
                                     "encode.cluster.address", "encode.cluster.workers",
                                     "encode.cluster.threads_per_worker", "encode.cluster.gpu_resource",
                                     "teacher.train.eval_every", "teacher.train.keep", "teacher.train.keep_tolerance",
                                     "teacher.train.until_below", "guidance.guide.train.eval_every",
                                     "guidance.guide.train.keep", "guidance.guide.train.keep_tolerance",
                                     "guidance.guide.train.until_below",
                                     "teacher.allow_code", "launch.nodes", "launch.procs_per_node",
                                     "launch.rdzv_endpoint", "launch.rdzv_id", "launch.max_restarts"])


def test_a_stage_body_cannot_read_a_field_it_does_not_declare():
    from cmt_core.engine import ConfigView, UndeclaredRead

    view = ConfigView(get_preset("toy"), STAGES["teacher"].reads, "teacher")
    assert view.teacher.train.steps == 1500 and view.data.name == "gaussian_mixture"
    with pytest.raises(UndeclaredRead, match="teacher.sampler"):
        _ = view.teacher.sampler
    with pytest.raises(UndeclaredRead, match="'midtrain'"):
        _ = view.midtrain


def test_every_preset_plans_every_stage_in_dependency_order():
    for name in PRESETS:
        cfg = get_preset(name)
        assert list(plan(cfg).ids) == list(STAGES)
        order = plan(cfg).needed(["evaluation"])
        guided = cfg.guidance.kind == "autoguidance"  # the guide runs only for autoguidance
        latent = cfg.data.encoder.kind != "identity"  # the encoder's stages run only in a latent space
        assert order == [s for s in STAGES if (s != "guide" or guided) and (s not in ("encoder", "encode") or latent)]
        for stage in order:
            assert all(order.index(dep) < order.index(stage) for dep in STAGES[stage].needs(cfg))


def test_posttraining_from_the_teacher_changes_id_with_the_sigma_min_it_trains_at():
    # it was left out of the id when posttrain.init != "cmt", so a stale artifact was reused
    base = get_preset("toy", ["posttrain.init=teacher"])
    other = get_preset("toy", ["posttrain.init=teacher", "rollout.solver.sigma_min=0.004"])
    assert "midtrain" not in plan(base).inputs["posttrain"]
    assert plan(base).ids["posttrain"] != plan(other).ids["posttrain"]
