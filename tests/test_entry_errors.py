"""Bad input to the entry points: exit status 2, the culprit named in the last line of stderr, no traceback,
no cluster started, and nothing on disk touched (issue #17's table, first part)."""

import io
import json
import shutil
import tarfile
import time

import numpy as np
import pytest
import ray

from config import load_config, to_yaml
from data import write_shards
from launcher import evaluate, rehearse, study, submit
from prefdata import annotate, autolabel, candidates, distortion_pairs
from launcher import train as train_cli
from reward import train as reward_train

CPU = "cluster_configs/local_cpu.yaml"


def write_tar(path, samples):
    """A shard written member by member, no checks: what a damaged or foreign writer leaves."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for name, data in members.items():
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def damaged_shards(tmp_path_factory):
    """A preference shard whose second pair's label is outside its choices, and a prompt shard whose second sample
    lacks the second person's photo (both intact as tars: only reading their records finds the fault)."""
    from data.demo import write_mixed_pairs
    from data.schema import make_meta, prompt_members
    from data.tarindex import expand_pattern, index_shard, read_members

    out = tmp_path_factory.mktemp("damaged")
    pairs = {}
    for ref in index_shard(expand_pattern(write_mixed_pairs(out / "src", 2, frames=2, size=56))[0]).samples:
        pairs[ref.key] = read_members(ref)
    label = json.loads(pairs["pair00001"]["label.json"])
    pairs["pair00001"]["label.json"] = json.dumps({**label, "preference": "left"}).encode()
    write_tar(out / "badlabel.tar", pairs)
    photo = np.full((32, 32, 3), 128, np.uint8)
    prompts = {f"p{i}": prompt_members("two people talk", [photo, photo], make_meta(2, None, "test")) for i in (0, 1)}
    del prompts["p1"]["ref_1.png"]
    write_tar(out / "noref.tar", prompts)
    return out


@pytest.fixture
def files(tmp_path, damaged_shards):
    for name in ("badlabel.tar", "noref.tar"):
        shutil.copy(damaged_shards / name, tmp_path / name)
    (tmp_path / "broken.yaml").write_text("model:\n  kind: vace\n  height: [1,\n")
    (tmp_path / "list.yaml").write_text("- model\n- sampler\n")
    ckpt = tmp_path / "run" / "checkpoints" / "step_000001"
    ckpt.mkdir(parents=True)
    (ckpt / "driver.pt").write_text("kept")
    (ckpt / "config.yaml").write_text(to_yaml(load_config(CPU, ["trainer.output_dir=elsewhere"])))
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_000001\n")
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "pairs.tar").write_bytes(b"shard")  # exists: only the key under test is wrong
    (tmp_path / "bad.jsonl").write_text('{"key": "a"\n')
    (tmp_path / "latin1.jsonl").write_bytes('{"prompt": "café"}\n'.encode("latin-1"))
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    return tmp_path


def train_args(files, *overrides):
    return ["--config", CPU, f"trainer.output_dir={files / 'run'}", *overrides]


CASES = [
    # (entry point, argv builder, text the last stderr line must contain)
    (train_cli, lambda f: train_args(f, "trainer.keep_last=0"), "'trainer.keep_last' must be > 0"),
    (train_cli, lambda f: train_args(f, "reward.weights={face: 0.0}"), "'reward.weights' must be finite and not all"),
    (train_cli, lambda f: train_args(f, "reward.weights.face=nan"), "'reward.weights' must be finite"),
    (train_cli, lambda f: train_args(f, f"data.prompt_shards={f}/none-{{000..002}}.tar"), "'data.prompt_shards'"),
    (train_cli, lambda f: train_args(f, f"trainer.resume={f}/nowhere"), "'trainer.resume'"),
    (train_cli, lambda f: ["--config", str(f / "broken.yaml")], "broken.yaml: line 4, column 1 not valid YAML"),
    (train_cli, lambda f: ["--config", str(f / "list.yaml")], "list.yaml: a config file must be a mapping"),
    (train_cli, lambda f: ["--config", str(f / "missing.yaml")], "config file not found"),
    (train_cli, lambda f: train_args(f, "sampler.schedule=ddim"), "'sampler.schedule'"),
    (train_cli, lambda f: train_args(f, "sampler.nosuch=1"), "sampler.nosuch"),
    (train_cli, lambda f: train_args(f, "sampler.std_max=big"), "sampler.std_max"),
    (train_cli, lambda f: train_args(f, "grpo.optimizer_steps_per_update=3"), "'grpo.optimizer_steps_per_update'"),
    (train_cli, lambda f: train_args(f, "optim.ema.enabled=true", "workers.learner_engine.zero_stage=3"),
     "'optim.ema.enabled'"),
    (train_cli, lambda f: train_args(f, "optim.ema.decay=1.5"), "'optim.ema.decay'"),
    (evaluate, lambda f: train_args(f, "--num-prompts", "0"), "argument --num-prompts: must be >= 1"),
    (evaluate, lambda f: train_args(f, "--seeds-per-prompt", "two"), "argument --seeds-per-prompt: expected int"),
    (evaluate, lambda f: train_args(f, "--weights", "best"), "argument --weights: invalid choice"),
    (rehearse, lambda f: ["--config", "cluster_configs/vace_1.3b_8gpu.yaml", "--learner-ranks", "1"],
     "argument --learner-ranks: must be >= 2"),
    (rehearse, lambda f: ["--config", str(f / "missing.yaml")], "rehearse: --config"),
    (write_shards, lambda f: ["--kind", "prompt", "--folder", str(f), "--out", str(f / "o"),
                              "--max-samples-per-shard", "0"], "argument --max-samples-per-shard: must be > 0"),
    (write_shards, lambda f: ["--kind", "prompt", "--folder", str(f), "--out", str(f / "o"), "--fps", "-1"],
     "argument --fps: must be > 0"),
    (reward_train, lambda f: ["--config", str(f / "broken.yaml")], "broken.yaml: line 4, column 1 not valid YAML"),
    # second part: ranges, paths before any work, every entry point
    (train_cli, lambda f: train_args(f, "trainer.max_staleness=-1"), "'trainer.max_staleness' must be >= 0"),
    (train_cli, lambda f: train_args(f, "trainer.max_learner_restarts=-2"), "'trainer.max_learner_restarts' must be"),
    (train_cli, lambda f: train_args(f, "logging.video_every=-1"), "'logging.video_every' must be >= 0"),
    (train_cli, lambda f: train_args(f, "optim.lr=-0.1"), "'optim.lr' must be >= 0"),
    (train_cli, lambda f: train_args(f, "logging.eval_every=2"), "'logging.eval_every'"),
    (train_cli, lambda f: ["--config", CPU, f"trainer.output_dir={f / 'a_file' / 'run'}"], "'trainer.output_dir'"),
    # resume=auto finds step 1, written with another LoRA rank and learner count: named before any start
    (train_cli, lambda f: train_args(f, "model.lora.rank=8", "workers.learner.num_workers=1"),
     "model.lora.rank=4 (this config: 8), workers.learner.num_workers=2 (this config: 1)"),
    (evaluate, lambda f: train_args(f, "--checkpoint", str(f / "nowhere")), "evaluate: checkpoint"),
    # every weight path a role will load, before Ray starts (launcher/preflight.py)
    (train_cli, lambda f: weight_args(f, "model.init=pretrained", f"model.path={f / 'nomodel'}"),
     "model.path: directory not found"),
    (train_cli, lambda f: weight_args(f, "model.init=pretrained", f"model.path={f}"), "is missing subfolder(s)"),
    (train_cli, lambda f: weight_args(f, "reward.weights={vlm: 1.0}", "reward.vlm.init=pretrained",
                                      f"reward.vlm.path={f / 'noreward'}"), "reward.vlm.path: directory"),
    (train_cli, lambda f: weight_args(f, "reward.weights={vlm: 1.0}", "reward.vlm.init=pretrained",
                                      f"reward.vlm.path={f}"), "has neither reward_model.json"),
    (train_cli, lambda f: weight_args(f, "reward.face.backend=arcface", f"reward.face.model_path={f / 'a.onnx'}"),
     "reward.face.model_path: no such ArcFace ONNX file"),
    (train_cli, lambda f: train_args(f, "model.dtype=float16"), "'model.dtype'"),
    (reward_train, lambda f: reward_args(f, f"data.preference_shards={f}/none-{{0..1}}.tar"),
     "reward.train: 'data.preference_shards'"),
    (reward_train, lambda f: reward_args(f, f"trainer.output_dir={f / 'a_file' / 'r'}"), "'trainer.output_dir'"),
    (reward_train, lambda f: reward_args(f, f"trainer.resume={f / 'nowhere'}"), "trainer.resume"),
    (reward_train, lambda f: reward_args(f, "trainer.steps=0"), "reward.train: config error: "),
    (write_shards, lambda f: ["--kind", "prompt", "--folder", str(f / "nowhere"), "--out", str(f / "o")],
     "write_shards: input folder"),
    (write_shards, lambda f: ["--kind", "prompt", "--manifest", str(f / "bad.jsonl"), "--out", str(f / "o")],
     "bad.jsonl line 1"),
    (write_shards, lambda f: ["--kind", "preference", "--folder", str(f), "--out", str(f / "o"), "--resample-frames"],
     "argument --resample-frames: needs --num-frames"),
    (submit, lambda f: ["--address", "http://127.0.0.1:9"], "submit: no job command"),
    (submit, lambda f: ["--address", "http://127.0.0.1:9", "--runtime-env", str(f / "none.yaml"), "--", "true"],
     "--runtime-env"),
    (submit, lambda f: ["--address", "http://127.0.0.1:9", "--runtime-env", str(f / "broken.yaml"), "--", "true"],
     "broken.yaml: not valid YAML"),
    (submit, lambda f: ["--address", "http://127.0.0.1:9", "--agent-timeout-s", "0", "--", "true"],
     "argument --agent-timeout-s: must be >= 1.0"),
    # third part (issue #31): data-layer errors, ignored keys, output paths under a file
    (train_cli, lambda f: weight_args(f), "pairs.tar' (whole shard): not a readable tar file"),
    (reward_train, lambda f: reward_args(f), "pairs.tar' (whole shard): not a readable tar file"),
    (evaluate, lambda f: train_args(f, f"data.prompt_shards={f}/pairs.tar", "--checkpoint", "base"),
     "pairs.tar' (whole shard): not a readable tar file"),
    (evaluate, lambda f: train_args(f, "--checkpoint", "base", "--out", str(f / "a_file" / "eval")), "'--out'"),
    (reward_train, lambda f: reward_args(f, f"data.preference_shards={f}/badlabel.tar"),
     "badlabel.tar', key 'pair00001': label.preference: must be one of ['a', 'b', 'tie'], got 'left'"),
    (train_cli, lambda f: weight_args(f, f"data.prompt_shards={f}/noref.tar"),
     "noref.tar', key 'p1': ref_1.png: missing (meta.num_people = 2"),
    (train_cli, lambda f: train_args(f, "model.path=/models/Wan2.1-VACE-1.3B-diffusers"),
     "'model.path' is set ('/models/Wan2.1-VACE-1.3B-diffusers') but 'model.init' is 'random'"),
    (write_shards, lambda f: ["--kind", "prompt", "--manifest", str(f / "latin1.jsonl"), "--out", str(f / "o")],
     "latin1.jsonl: field '<file>': not UTF-8 text"),
    (write_shards, lambda f: ["--kind", "prompt", "--manifest", str(f / "blank.jsonl"), "--out", str(f / "o")],
     "blank.jsonl: field '<file>': has no record"),
    # the preference-data tools: bad input named before any Ray cluster or server starts
    (candidates, lambda f: [f"candidates.prompt_shards={f}/none.tar"], "candidates: shard '"),
    (candidates, lambda f: [f"candidates.prompt_shards={f}/pairs.tar"], "pairs.tar' (whole shard): not a readable tar"),
    (candidates, lambda f: [f"candidates.generators=[{{name: g, config: {f / 'missing.yaml'}, checkpoint: base}}]"],
     "candidates.generators[0] (g): config file not found"),
    (autolabel, lambda f: [f"autolabel.candidate_shards={f}/pairs.tar"],
     "pairs.tar' (whole shard): not a readable tar"),
    (annotate, lambda f: ["serve", "--pairs", f"{f}/pairs.tar", "--dir", str(f / "task")],
     "pairs.tar: not a readable tar file"),
    (distortion_pairs, lambda f: [f"distortions.clips={f}/none.jsonl", f"distortions.out={f / 'o'}"],
     "none.jsonl: field '<file>': cannot be read"),
    (study, lambda f: ["reward-data", "--out", str(f / "o"), "--human-train", "x"],
     "give all four shard patterns or none; missing --human-test, --auto, --synthetic"),
    (study, lambda f: ["grpo-design", "--out", str(f / "o"), "--arms", "group3", "--held-out-prompts", "x"],
     "--arms: unknown arm(s) ['group3'] of study grpo-design"),
    (annotate, lambda f: ["report", "--dir", str(f / "nowhere")], "no task.json"),
    (annotate, lambda f: ["export", "--dir", str(f / "nowhere"), "--out", str(f / "o")], "no task.json"),
    # nobody listens: retried, bounded, then one line naming the address
    (submit, lambda f: ["--address", "http://127.0.0.1:9", "--agent-timeout-s", "1", "--", "true"],
     "the Ray head at http://127.0.0.1:9 did not accept jobs within --agent-timeout-s 1"),
]


def weight_args(files, *overrides):
    """Everything else valid (an existing shard, a fresh start), so that the weight check is what fails."""
    return train_args(files, f"data.prompt_shards={files}/pairs.tar", "trainer.resume=never", *overrides)


def reward_args(files, *overrides):
    return ["--config", "cluster_configs/reward_local_cpu.yaml", f"trainer.output_dir={files / 'rw'}",
            f"data.preference_shards={files}/pairs.tar", *overrides]


@pytest.mark.parametrize("module,argv,culprit", CASES, ids=lambda x: getattr(x, "__name__", None))
def test_bad_input_is_one_line_and_exit_2(files, capsys, module, argv, culprit):
    start = time.monotonic()
    try:
        code = module.main(argv(files))  # write_shards returns its status; the others exit
    except SystemExit as exit_info:
        code = exit_info.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert culprit in err.strip().splitlines()[-1], err
    assert "Traceback" not in err and not ray.is_initialized()
    assert time.monotonic() - start < 20  # config and path mistakes cost seconds, not a cluster start
    assert (files / "run" / "checkpoints" / "step_000001" / "driver.pt").read_text() == "kept"
    assert (files / "pairs.tar").read_bytes() == b"shard" and not (files / "o").exists() and not (files / "rw").exists()


def test_relative_output_dir_in_a_ray_job_is_refused(files, capsys, monkeypatch):
    """Under `ray job submit` the working directory is the job's uploaded copy on the head node: a relative
    trainer.output_dir would leave every checkpoint there. The preset's own relative default is refused too."""
    from launcher.preflight import RAY_JOB_ENV, check_output_dir

    monkeypatch.setenv(RAY_JOB_ENV, "{}")
    with pytest.raises(SystemExit) as exit_:
        train_cli.main(["--config", CPU, "trainer.output_dir=outputs/in_a_job"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and "'trainer.output_dir' outputs/in_a_job is relative, and this is a Ray job" in last
    assert "trainer.output_dir=/shared/runs/in_a_job" in last and not ray.is_initialized()
    monkeypatch.delenv(RAY_JOB_ENV)
    check_output_dir(load_config(CPU, ["trainer.output_dir=outputs/in_a_job"]))  # outside a job: accepted


def test_the_table_covers_every_entry_point():
    modules = {module for module, _, _ in CASES}
    assert {train_cli, evaluate, reward_train, write_shards, submit} <= modules and len(CASES) >= 30


def test_debug_lets_the_expected_error_propagate(files, monkeypatch):
    """IDENTITY_GRPO_DEBUG=1: the same mistakes raise, traceback and all, instead of one line and exit 2."""
    from config import ConfigError
    from data.manifest import ManifestError

    monkeypatch.setenv("IDENTITY_GRPO_DEBUG", "1")
    with pytest.raises(ConfigError, match="'trainer.keep_last' must be > 0"):  # while loading the config
        train_cli.main(train_args(files, "trainer.keep_last=0"))
    with pytest.raises(ConfigError, match="'trainer.resume'"):  # in the checks before Ray
        train_cli.main(train_args(files, f"trainer.resume={files}/nowhere"))
    with pytest.raises(ManifestError, match="bad.jsonl line 1"):
        write_shards.main(["--kind", "prompt", "--manifest", str(files / "bad.jsonl"), "--out", str(files / "o")])


ERRORS_DOC = "docs/ERRORS.md"
ERRORS_DOC_HEAD = """# What each entry point refuses, and how

Every row is a case of `tests/test_entry_errors.py` (`CASES`), which runs it: exit status 2, the text in the last
line of stderr, no traceback, no Ray cluster started. `F/` is the test's scratch folder, with an unreadable `pairs.tar`,
a preference shard with a label outside its choices (`badlabel.tar`), a prompt shard missing a person's photo
(`noref.tar`), a file `a_file`, a broken and a list-valued YAML, bad manifests and a checkpoint of another model
shape. This table is
generated from the cases (`python -c "from tests.test_entry_errors import errors_table; print(errors_table(), end='')"
> docs/ERRORS.md`), and a test keeps the two equal. More rows with their own fixtures: `launcher.export` (a missing
step, an out directory that is not empty or lies under a file, a damaged LoRA file: tests/test_export.py), the official
reward checkpoint (a damaged adapter or non-LoRA file, a setting the loader does not read, a missing base:
tests/test_reward_official.py), the preference-data tools on data they already wrote (tests/test_reward_data.py,
test_prefdata_autolabel.py, test_prefdata_annotate.py).

| entry point | input | the one line contains |
|---|---|---|
"""


def errors_table() -> str:
    from pathlib import Path

    rows = []
    for module, argv, culprit in CASES:
        args = " ".join(str(a) for a in argv(Path("F"))).replace("|", "\\|")
        rows.append(f"| `{module.__name__}` | `{args}` | {culprit.replace('|', chr(92) + '|')} |")
    return ERRORS_DOC_HEAD + "\n".join(rows) + "\n"


def test_errors_doc_is_the_cases(root):
    assert (root / ERRORS_DOC).read_text() == errors_table(), f"regenerate {ERRORS_DOC} (see its first lines)"
