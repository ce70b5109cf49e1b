"""Bad input costs seconds: each of the inputs below is refused before anything runs or is written, with one
line that names the field (or the file), through the command line (``cmt run``: exit code 2) and through the
Prefect API (a flow run of ``cmt-pipeline`` that fails with the same message). The property-based tests at the
end check the config models themselves: what is accepted round-trips through YAML with a stable id, what is
rejected is rejected naming a field."""

from __future__ import annotations

import os
import pickle

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cmt_core.cli import main as cmt  # noqa: E402
from cmt_core.config import PipelineConfig, load_yaml, save_yaml  # noqa: E402
from cmt_core.errors import config_message  # noqa: E402
from cmt_core.presets import get_preset  # noqa: E402
from cmt_core.stages import plan  # noqa: E402

MARKER = "code-ran"


class RunsCode:
    """A pickled object whose loading would create ``MARKER`` in the working directory."""

    def __reduce__(self):
        return (open, (MARKER, "w"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad files the table points at."""
    folder = tmp_path_factory.mktemp("inputs")
    (folder / "garbage.pt").write_bytes(b"not a checkpoint at all")
    torch.save({"weights": RunsCode()}, folder / "runs_code.pt")
    (folder / "runs_code.pkl").write_bytes(pickle.dumps(RunsCode()))
    (folder / "a_folder").mkdir()
    (folder / "broken.yaml").write_text("midtrain: {train: [1, 2\n")
    (folder / "list.yaml").write_text("- 1\n- 2\n")
    (folder / "a_file").write_text("x")
    return folder


def _callable(target: str, *extra: str) -> list[str]:
    return ["teacher.source=callable", f"teacher.target={target}", "teacher.allow_code=true", "midtrain.init=random",
            *extra]


# (overrides, words the one-line message must hold); {files} is the fixture's folder
CASES = {
    "negative steps": (["midtrain.train.steps=-1"], "midtrain.train.steps"),
    "betas out of [0, 1)": (["midtrain.train.betas=[2,3]"], "midtrain.train.betas"),
    "infinite sigma_max": (["rollout.solver.sigma_max=inf"], "rollout.solver.sigma_max"),
    "nan learning rate": (["midtrain.train.lr=nan"], "midtrain.train.lr"),
    "CMT boundary without CMT weights": (["posttrain.ect.anchor_sigma=0.5", "posttrain.init=teacher"],
                                         "posttrain.ect.anchor_sigma"),
    "infinite EMA decay": (["posttrain.train.ema_decay=-inf"], "posttrain.train.ema_decay"),
    "keep_indices past the grid": (["rollout.store.keep_indices=[0,100]"], "keep_indices"),
    "keep_indices not increasing": (["rollout.store.keep_indices=[3,1]"], "keep_indices"),
    "missing TorchScript teacher": (["teacher.source=torchscript", "teacher.path={files}/absent.pt",
                                     "midtrain.init=random"], "teacher.path"),
    "callable teacher that is not a denoiser": (_callable("os:getcwd"), "teacher.target"),
    "callable teacher without allow_code": (["teacher.source=callable", "teacher.target=os:system"], "allow_code"),
    "checkpoint teacher that is garbage": (["teacher.source=checkpoint", "teacher.path={files}/garbage.pt"],
                                           "teacher.path"),
    "checkpoint teacher that runs code": (["teacher.source=checkpoint", "teacher.path={files}/runs_code.pt"],
                                          "teacher.path"),
    "EDM pickle that runs code": (["teacher.source=edm_pickle", "teacher.path={files}/runs_code.pkl"],
                                  "teacher.path"),
    "SiT checkpoint that is garbage": (["teacher.source=sit", "teacher.path={files}/garbage.pt",
                                       "midtrain.init=random"], "teacher.path"),
    "SiT checkpoint that runs code": (["teacher.source=sit", "teacher.path={files}/runs_code.pt",
                                       "midtrain.init=random"], "teacher.path"),
    "SiT teacher initialising a student": (["teacher.source=sit", "teacher.path={files}/garbage.pt"],
                                           "midtrain.init"),
    "guided Mean Flow without classes": (["posttrain.method=meanflow", "midtrain.form=flow_map",
                                          "posttrain.ect.anchor_sigma=0", "posttrain.meanflow.guidance.omega=0.5"],
                                         "posttrain.meanflow.guidance"),
    "DiT on 2-D points": (["network.kind=dit"], "network.kind"),
    "teacher path is a folder": (["teacher.source=checkpoint", "teacher.path={files}/a_folder"], "teacher.path"),
    "teacher init without weights": (["teacher.source=torchscript", "teacher.path={files}/garbage.pt"],
                                     "midtrain.init"),
    "unknown precision": (["precision=fp16"], "precision"),
    "unknown field": (["midtrain.train.lrr=1"], "midtrain.train.lrr"),
    "override without =": (["midtrain.train.lr"], "midtrain.train.lr"),
    "override value not YAML": (["midtrain.train.betas=[0.9,"], "midtrain.train.betas"),
    "override into a value": (["device.kind=1"], "device"),
    "unknown post-training method": (["posttrain.method=bogus"], "posttrain.method"),
    "npz data without a path": (["data.name=npz"], "data.path"),
    "one evaluation sample": (["eval.num_samples=1"], "eval.num_samples"),
    "MF-form CMT before ECT": (["midtrain.form=mf"], "midtrain.form"),
    "ECT q of 1": (["posttrain.ect.q=1"], "posttrain.ect.q"),
    "unknown solver": (["rollout.solver.name=rk9"], "rollout.solver.name"),
    "sigma_min above sigma_max": (["rollout.solver.sigma_min=100"], "sigma_min"),
    "pseudo-Huber with c = 0": (["midtrain.distance=pseudo_huber"], "huber_c"),
    "zero CPU threads": (["cpu_threads=0"], "cpu_threads"),
    "Mean Flow fraction above 1": (["posttrain.meanflow.equal_fraction=1.5"], "equal_fraction"),
    "dropout of 1": (["network.dropout=1"], "network.dropout"),
    "negative held-out fraction": (["data.heldout_fraction=-0.1"], "data.heldout_fraction"),
}
if not torch.cuda.is_available():
    CASES["device=cuda without a GPU"] = (["device=cuda"], "device")


def _overrides(case: str, files) -> list[str]:
    return [o.replace("{files}", str(files)) for o in CASES[case][0]]


def _one_line_naming(message: str, words: str) -> None:
    assert message.count("\n") == 0, message
    assert words in message, message


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_through_the_command_line(case, files, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a loaded file that ran code would leave MARKER here
    root = tmp_path / "artifacts"
    args = ["run", "--preset", "toy", "--artifact-root", str(root)]
    for override in _overrides(case, files):
        args += ["--set", override]
    assert cmt(args) == 2
    err = capsys.readouterr().err.strip()
    _one_line_naming(err, CASES[case][1])
    assert not root.exists(), "nothing is written for bad input"
    assert not (tmp_path / MARKER).exists(), "no code ran from a file"


@pytest.mark.parametrize("args,words", [
    (["--config", "{files}/absent.yaml"], "--config"),
    (["--config", "{files}/broken.yaml"], "not valid YAML"),
    (["--config", "{files}/list.yaml"], "mapping"),
    (["--artifact-root", "{files}/a_file"], "artifact_root"),
    (["--artifact-root", "s3://"], "artifact_root: 's3://' names no bucket"),
    (["--artifact-root", "nosuch://bucket/runs"], "artifact_root='nosuch://bucket/runs' cannot be reached"),
], ids=["missing YAML", "YAML syntax error", "YAML not a mapping", "artifact root is a file", "URL without a bucket",
        "URL of an unknown protocol"])
def test_bad_files_given_to_the_command_line(args, words, files, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cmt(["run", "--preset", "toy", *[a.replace("{files}", str(files)) for a in args]]) == 2
    _one_line_naming(capsys.readouterr().err.strip(), words)
    assert not any(tmp_path.iterdir()), "nothing is written for bad input"


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.mark.slow
def test_bad_input_through_the_prefect_api(prefect_api, files, tmp_path, monkeypatch):
    """Every case of the table as a ``cmt-pipeline`` flow run (created and reported through the API), plus
    path parameters outside the allowed roots and URLs outside the allowed prefixes."""
    from flows.pipeline import cmt_pipeline

    monkeypatch.chdir(tmp_path)
    root = tmp_path / "artifacts"
    cases = {case: (_overrides(case, files), CASES[case][1], str(root)) for case in CASES}
    monkeypatch.setenv("CMT_ALLOWED_ROOTS", os.pathsep.join([str(tmp_path), str(files)]))
    cases["artifact root outside the allowed roots"] = ([], "artifact_root", "/etc/cmt")
    cases["artifact root escaping by .."] = ([], "outside the allowed roots", f"{tmp_path}/../../etc")
    link = tmp_path / "escape"
    link.symlink_to("/etc")
    cases["artifact root escaping by a symlink"] = ([], "outside the allowed roots", str(link / "cmt"))
    monkeypatch.setenv("CMT_ALLOWED_URLS", "s3://team-bucket/cmt")
    cases["bucket prefix not allowed"] = ([], "not under an allowed URL prefix", "s3://team-bucket/other")
    cases["bucket prefix escaping by .."] = ([], "not under an allowed URL prefix", "s3://team-bucket/cmt/../x")
    cases["mirror of a bucket outside the allowed roots"] = (["cache_root=/etc/cmt"], "cache_root",
                                                            "s3://team-bucket/cmt/runs")
    for case, (overrides, words, artifact_root) in cases.items():
        state = cmt_pipeline(preset="toy", overrides=overrides, artifact_root=artifact_root, return_state=True)
        assert state.is_failed(), case
        message = state.message.split(": ", 1)[1]  # after Prefect's "Flow run encountered an exception"
        assert words in message and "\n" not in message.strip(), f"{case}: {state.message}"
    assert not root.exists() and not (tmp_path / MARKER).exists()


# ------------------------------------------------------------------------------------ property-based

# a field and candidate values, valid and invalid, drawn together in random combinations
FIELD_VALUES = {
    "midtrain.train.lr": [1e-4, 0.5, 0.0, -1.0, float("nan"), float("inf"), "x"],
    "midtrain.train.steps": [0, 10, -5, 2.5, None],
    "midtrain.train.betas": [[0.9, 0.99], [0.0, 0.5], [1.0, 0.5], [0.9], "a"],
    "posttrain.ect.q": [2.0, 256.0, 1.0, 0.5],
    "posttrain.method": ["ect", "ecd", "meanflow", "nope"],
    "midtrain.form": ["cm", "mf", "flow_map", "xx"],
    "rollout.solver.name": ["euler", "heun", "dpm2m", "dpm3m", "rk9"],
    "rollout.solver.steps": [1, 8, 0, 5000],
    "rollout.solver.sigma_min": [0.002, 0.01, 0.0, 200.0, float("inf")],
    "rollout.store.keep_indices": [None, [0, 1], [0, 16], [0, 99], [2, 1], [5]],
    "rollout.store.dtype": ["float32", "float16", "bfloat16", "int8"],
    "eval.mid_sigma_search": [[], [0.5, 1.0], [-1.0], [float("nan")]],
    "network.dropout": [0.0, 0.3, 1.0, -0.1],
    "precision": ["auto", "fp32", "bf16", "fp8"],
    "midtrain.distance": ["squared_l2", "l2_norm", "pseudo_huber", "lpips"],
    "midtrain.huber_c": [0.0, 0.03, -1.0],
}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(sorted(FIELD_VALUES)), st.integers(0, 6), max_size=5),
       st.sampled_from(["toy", "digits"]))
def test_accepted_configs_round_trip_and_rejected_ones_name_a_field(tmp_path, choices, preset):
    overrides = {f: FIELD_VALUES[f][k % len(FIELD_VALUES[f])] for f, k in choices.items()}
    sets = [f"{field}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
            for field, value in overrides.items()]
    try:
        cfg = get_preset(preset, sets)
    except ValueError as err:
        message = config_message(err)
        named = [field for field in overrides if field in message or field.split(".")[-1] in message]
        assert named or any(word in message for word in ("sigma_min", "form", "keep_indices", "lpips")), message
        assert "\n" not in message
        return
    path = tmp_path / f"cfg-{abs(hash(tuple(sets)))}.yaml"
    save_yaml(cfg, path)
    again = load_yaml(path)
    assert again == cfg
    assert plan(again).ids == plan(cfg).ids == plan(PipelineConfig.model_validate(cfg.model_dump(mode="json"))).ids
