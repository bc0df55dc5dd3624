"""Preference data end to end (`tools`: minutes, Ray): candidates sampled on the trainer's Ray rollout workers,
resumed after a lost shard; and `make reward-data`'s pipeline (candidates, auto labels, the annotation page with
scripted annotators, export and split, synthetic pairs, reward.train) on a smaller setting, as the reward-data
study, killed and resumed."""

import json
from pathlib import Path

import pytest
import yaml

from data.reader import ShardReader
from data.write_shards import existing_shards
from prefdata.candidates import candidate_seeds
from prefdata.candidates import main as candidates_main
from tests.stand_ins import policy_with_visible_lora

# Its own lane (`make test-tools`): CI runs it after the rehearsals and faults, the lane that ends first.
pytestmark = pytest.mark.tools


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    """One local Ray cluster for the module: the tools attach to a running one (workers.ray_cluster.connect_ray)
    instead of starting and stopping their own on every call."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=256 * 1024 * 1024,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    from data.demo import build_demo

    pattern, _ = build_demo(tmp_path_factory.mktemp("demo"), num_prompts=3, num_pairs=1, samples_per_shard=8)
    return pattern


def _lora_dir(tmp_path) -> Path:
    """A LoRA for the tiny local_cpu policy (diffusers format) whose adapters visibly change it."""
    from config import load_config
    from policy.lora import save_lora

    save_lora(policy_with_visible_lora(load_config("cluster_configs/local_cpu.yaml")).transformer, tmp_path / "lora",
              "vace")
    return tmp_path / "lora"


def test_candidates_on_rollout_workers_resume_after_a_lost_shard(tmp_path, prompts, capsys):
    """Two generators with the same weights and settings give the same videos from the shared seeds (determinism),
    one sampling with another guidance scale and one with a LoRA checkpoint give others; a shard lost in a crash
    is sampled again, identically."""
    lora = _lora_dir(tmp_path)
    config = tmp_path / "prefdata.yaml"
    config.write_text(yaml.safe_dump({"candidates": {
        "prompt_shards": prompts, "videos_per_generator": 2, "out": str(tmp_path / "cand"), "samples_per_shard": 4,
        "generators": [{"name": "tiny", "config": "cluster_configs/local_cpu.yaml", "checkpoint": "base"},
                       {"name": "same", "config": "cluster_configs/local_cpu.yaml", "checkpoint": "base"},
                       {"name": "cfg7", "config": "cluster_configs/local_cpu.yaml", "checkpoint": "base",
                        "overrides": ["sampler.guidance_scale=7.0"]},
                       {"name": "lora", "config": "cluster_configs/local_cpu.yaml", "checkpoint": str(lora)}]}}))
    first = candidates_main(["--config", str(config)])
    assert first["written"] == 24 and first["skipped_existing"] == 0
    shards = existing_shards(tmp_path / "cand", "candidates")
    assert len(shards) == 6  # 24 videos, 4 per shard
    samples = {s["key"]: s for s in ShardReader(shards, kind="candidate", shuffle=False, epochs=1)}
    assert len(samples) == 24
    for key, s in samples.items():
        c = s["candidate"]
        assert key == f"{c['prompt_key']}-{c['generator']}-{c['extra']['index']}" and c["sampler"] == "ode"
        assert c["seed"] == candidate_seeds(0, c["prompt_key"], 2)[c["extra"]["index"]]
        lora_file = str(lora / "pytorch_lora_weights.safetensors")
        assert c["checkpoint"] == (lora_file if c["generator"] == "lora" else "base")
        assert s["video"].shape == (9, 32, 32, 3) and s["meta"]["videos"]["video"]["num_frames"] == 9
    for key in [k for k in samples if "-tiny-" in k]:
        assert (samples[key]["video"] == samples[key.replace("-tiny-", "-same-")]["video"]).all()
        for other in ("-cfg7-", "-lora-"):
            assert (samples[key]["video"] != samples[key.replace("-tiny-", other)]["video"]).any()
    assert (samples["prompt00000-tiny-0"]["video"] != samples["prompt00000-tiny-1"]["video"]).any()  # seeds differ

    # a crash lost the last two shards: the rerun samples exactly what is missing, into shards after the others
    lost = {}
    for path in shards[-2:]:
        lost.update({s["key"]: s for s in ShardReader([path], kind="candidate", shuffle=False, epochs=1)})
        Path(path).unlink()
    again = candidates_main(["--config", str(config)])
    assert again["written"] == len(lost) == 8 and again["skipped_existing"] == 16
    redone = {s["key"]: s for s in ShardReader(again["shards"], kind="candidate", shuffle=False, epochs=1)}
    assert set(redone) == set(lost)
    assert all((redone[k]["video"] == lost[k]["video"]).all() for k in lost)
    assert candidates_main(["--config", str(config)])["written"] == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as err:  # other settings into the same folder: refused, naming the key
        candidates_main(["--config", str(config), "candidates.sampler=sde"])
    assert err.value.code == 2 and "candidates.sampler" in capsys.readouterr().err
    Path(shards[1]).unlink()  # a gap in the numbering: refused (new shards would take taken numbers)
    with pytest.raises(SystemExit) as err:
        candidates_main(["--config", str(config)])
    assert err.value.code == 2 and "candidates-000001.tar is missing" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:  # a generator that does not fit: named before anything is sampled
        candidates_main(["--config", str(config), "--overwrite",
                         f"candidates.generators=[{{name: bad, config: cluster_configs/local_cpu.yaml, "
                         f"checkpoint: {tmp_path / 'nowhere'}}}]"])
    assert err.value.code == 2 and "candidates.generators[0] (bad)" in capsys.readouterr().err
    assert len(existing_shards(tmp_path / "cand", "candidates")) == 5  # untouched: --overwrite never got that far


def test_reward_data_study_runs_the_demo_pipeline_and_resumes_after_a_kill(tmp_path, capsys):
    """`make reward-data`'s pipeline on a smaller setting, through the reward-data study (launcher/study.py): every
    stage hands the next what it needs; the study killed -9 after its first run resumes without rerunning it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from launcher.study import main as study_main

    out = tmp_path / "study"
    argv = ["reward-data", "--out", str(out), "--seeds", "0", "--arms", "human,mixed_teacher", "--demo-clips", "4",
            "--data-set", "candidates.num_prompts=8", "--data-set", "candidates.videos_per_generator=2",
            "--data-set", "autolabel.pairs_per_prompt=4", "--train-set", "trainer.steps=20",
            "--train-set", "teacher.train_steps=10"]
    first = out / "runs" / "human" / "seed0" / "result.json"
    with open(tmp_path / "first.log", "w") as log:
        study = subprocess.Popen([sys.executable, "-m", "launcher.study", *argv], stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        deadline = time.monotonic() + 900
        while not first.is_file() and study.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        os.killpg(study.pid, signal.SIGKILL)  # the study and the run it started next
        study.wait()
    assert first.is_file(), (tmp_path / "first.log").read_text()[-3000:]
    stamp = first.stat().st_mtime_ns
    assert not (out / "runs" / "mixed_teacher" / "seed0" / "result.json").is_file()

    table = study_main(argv)
    assert "[study] human seed 0: finished before, kept" in capsys.readouterr().out
    assert first.stat().st_mtime_ns == stamp  # not rerun
    assert [row["arm"] for row in table["arms"]] == ["human", "mixed_teacher"]
    for row in table["arms"]:
        assert 0.0 <= row["metrics"]["accuracy_with_ties"]["mean"] <= 1.0
    data = out / "data"
    auto = json.loads((data / "auto" / "pairs.autolabel.json").read_text())
    assert auto["people"]["kept"] > 0 and auto["kept"] > 0 and auto["pairs"] + auto["people"]["pairs"] == 8 * 4

    def read(pattern):
        return list(ShardReader(pattern, kind="preference", shuffle=False, epochs=1))

    shared = table["shared"]
    train, test = read(shared["human_train"]), read(shared["human_test"])
    assert train and test and all(s["label"]["source"] == "human" and set(s["label"]["extra"]["annotators"]) ==
                                  {"demo-ann1", "demo-ann2"} for s in train + test)
    prompts = {name: {s["meta"]["extra"]["prompt_key"] for s in read(shared[name])} for name in ("human_train",
                                                                                                 "human_test", "auto")}
    assert not prompts["human_train"] & prompts["human_test"]  # the test prompts are never trained on
    assert not (prompts["human_train"] | prompts["human_test"]) & prompts["auto"]
    synthetic = read(shared["synthetic"])
    assert synthetic and all(s["label"]["source"] == "synthetic" for s in synthetic)
    filtered = json.loads((out / "runs" / "mixed_teacher" / "seed0" / "model" / "teacher_filter.json").read_text())
    assert filtered["num_candidates"] > 0
