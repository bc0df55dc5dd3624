"""`make reward-data`: preference data on the CPU demo, from prompts to reward models scored on human test pairs.

`prepare(DIR)` builds the reward-data study's demo data (launcher/study_reward_data.py), each step resumable:
1. 96 demo prompts (data.demo) and the demo base model, as `make demo` builds it (when missing);
2. candidates (`python -m prefdata.candidates`, cluster_configs/reward_data_demo.yaml): two demo generators sample
   4 videos each per prompt on Ray rollout workers;
3. auto labels (`python -m prefdata.autolabel`): 12 pairs per prompt labelled by the vote; the pairs of half the
   prompts are set apart for people (`autolabel.people_fraction`);
4. labels through the page: the annotation server runs as users run it (`python -m prefdata.annotate serve`, its own
   process) and two scripted annotators label every pair through the page's HTTP API (they stand in for people:
   `demo-ann1` prefers the video whose colours match the references, the DEMO reward's rule, `demo-ann2` makes
   the same choice with a fifth of them flipped); then the agreement report and the export to `source: human`
   shards, split by prompt into human train and human test pairs (data.write_shards.split_by_prompt);
5. synthetic pairs: real faces composited into clips (data.demo.write_demo_clips) and
   `python -m prefdata.distortion_pairs` on them.

`make reward-data` (`python -m launcher.study reward-data --arms mixed_teacher --out outputs/reward_data`) then
trains the reward model as the paper does (human + synthetic + auto pairs, the auto pairs filtered by a teacher)
with three seeds and prints its accuracy on the human test pairs with the interval over seeds; `make
study-reward-data` runs every arm. A rerun reuses what is there and prints the same numbers.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import List, Sequence

import numpy as np

CONFIG = "cluster_configs/reward_data_demo.yaml"
ANNOTATORS = {"demo-ann1": 0.0, "demo-ann2": 0.2}  # scripted annotator -> fraction of choices flipped
COLOUR_MARGIN = 0.004  # the annotators call a pair equal within this demo reference-colour difference


def scripted_annotator(base_url: str, name: str, flip: float) -> int:
    """Label every pair the server gives `name`, through the page's API; returns the number labelled."""
    import requests

    from data.video import decode_image, decode_video
    from reward.demo import demo_reference_color

    count = 0
    with requests.Session() as http:
        view = http.get(f"{base_url}/api/next", params={"annotator": name}, timeout=30).json()
        while view.get("pair") is not None:
            refs = [decode_image(http.get(base_url + ref["src"], timeout=30).content) for ref in view["refs"]]
            left, right = (decode_video(http.get(base_url + view[side], timeout=30).content)
                           for side in ("left", "right"))
            diff = float(demo_reference_color([left], [refs])[0] - demo_reference_color([right], [refs])[0])
            choice = "tie" if abs(diff) <= COLOUR_MARGIN else ("left" if diff > 0 else "right")
            rng = np.random.default_rng(list(hashlib.sha256(f"{name}/{view['pair']}".encode()).digest()[:8]))
            if choice != "tie" and rng.random() < flip:
                choice = "right" if choice == "left" else "left"
            response = http.post(f"{base_url}/api/label", json={"annotator": name, "session": "scripted",
                                                                 "pair": view["pair"], "choice": choice}, timeout=30)
            if response.status_code != 200:
                raise RuntimeError(f"annotation server refused a label: {response.json()}")
            view, count = response.json(), count + 1
    return count


def annotate(pairs: str, directory: Path) -> None:
    """Serve the page, let the scripted annotators label, print the report (annotation server in its own process)."""
    import requests

    server = subprocess.Popen([sys.executable, "-m", "prefdata.annotate", "serve", "--pairs", pairs,
                               "--dir", str(directory),
                               "--port", "0"], stdout=subprocess.PIPE, text=True)
    try:
        url = None
        for line in server.stdout:
            print(f"[reward-data] {line.rstrip()}")
            if "serving on " in line:
                url = line.split("serving on ", 1)[1].strip().rstrip("/")
                break
        if url is None:
            raise RuntimeError("the annotation server did not start (its output is above)")
        for name, flip in ANNOTATORS.items():
            print(f"[reward-data] {name} labelled {scripted_annotator(url, name, flip)} pairs through the page")
        report = requests.get(f"{url}/api/report", timeout=30).json()
    finally:
        server.terminate()
        server.wait(timeout=30)
    between = report["between_annotators"].get("demo-ann1|demo-ann2", {})
    print(f"[reward-data] agreement: between annotators {between.get('agreement')} (Cohen's kappa "
          f"{between.get('kappa')}) on {between.get('pairs')} pairs; with the auto labels "
          f"{report['with_auto_labels']['per_annotator']}")


def step(title: str, argv: List[str]) -> None:
    print(f"[reward-data] {title}: python {' '.join(argv)}", flush=True)
    subprocess.run([sys.executable, *argv], check=True)


NUM_PROMPTS = 96
HUMAN_TEST_FRACTION = 0.5  # of the human pairs' prompts: the test split every arm is scored on
NUM_CLIPS, PAIRS_PER_CLIP = 96, 3  # synthetic pairs: clips of real faces, distortions of each


def demo_patterns(data: Path) -> dict:
    """The shard patterns `prepare(data)` writes, as far as they are there (for `--list`, which prepares nothing)."""
    from data.write_shards import existing_pattern

    data = Path(data)
    return {"human_train": existing_pattern(data / "human", "human_train"),
            "human_test": existing_pattern(data / "human", "human_test"),
            "auto": existing_pattern(data / "auto", "pairs"),
            "synthetic": existing_pattern(data / "synthetic", "synthetic")}


def prepare(data: Path, config: str = CONFIG, sets: Sequence[str] = (), num_clips: int = NUM_CLIPS) -> dict:
    """Build (or reuse) the demo's preference data under `data` (module docstring); returns the four patterns."""
    from data.demo import build_demo, write_demo_clips
    from data.write_shards import existing_pattern, split_by_prompt
    from launcher.demo import ensure_demo_model
    from prefdata.settings import load_prefdata_config
    from workers.run_config import load_run_config

    data = Path(data)
    prompts = data / "prompts"
    if not (prompts / "done").is_file():  # a build cut short leaves fewer shards: built again
        build_demo(prompts, num_prompts=NUM_PROMPTS, num_pairs=1, samples_per_shard=16)
        (prompts / "done").write_text("written by launcher.reward_data_demo.prepare\n")
    sets = [f"candidates.prompt_shards={existing_pattern(prompts, 'prompts')}",
            *sets, f"candidates.out={data}/candidates", f"autolabel.out={data}/auto"]
    cfg = load_prefdata_config(config, sets)
    for generator in cfg.candidates.generators:
        ensure_demo_model(load_run_config(generator.config, list(generator.overrides)).model)
    step("candidates", ["-m", "prefdata.candidates", "--config", config, *sets])
    candidates = existing_pattern(data / "candidates", cfg.candidates.prefix)
    step("auto labels", ["-m", "prefdata.autolabel", "--config", config, *sets,
                         f"autolabel.candidate_shards={candidates}", "--overwrite"])
    labelled = json.loads((data / "auto" / f"{cfg.autolabel.prefix}.autolabel.json").read_text())
    annotate(labelled["people"]["pattern"], data / "annotation")
    step("export", ["-m", "prefdata.annotate", "export", "--dir", str(data / "annotation"), "--out",
                    str(data / "exported"), "--overwrite"])
    exported = existing_pattern(data / "exported", "human")
    train, test = split_by_prompt(exported, data / "human", ("human_train", "human_test"), HUMAN_TEST_FRACTION)
    clips = data / "clips"
    if not (clips / "done").is_file():
        write_demo_clips(clips, num_clips)
        (clips / "done").write_text("written by launcher.reward_data_demo.prepare\n")
    step("synthetic pairs", ["-m", "prefdata.distortion_pairs", "--config", config, *sets,
                             f"distortions.clips={clips}", f"distortions.out={data}/synthetic",
                             f"distortions.pairs_per_clip={PAIRS_PER_CLIP}"])
    synthetic = existing_pattern(data / "synthetic", "synthetic")
    print(f"[reward-data] human train {train}, human test {test}, auto {labelled['pattern']}, synthetic {synthetic}")
    return {"human_train": train, "human_test": test, "auto": labelled["pattern"], "synthetic": synthetic}
