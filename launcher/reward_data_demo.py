"""`make reward-data`: preference data on the CPU demo, from prompts to a trained reward model's held-out accuracy.

1. the demo prompt shards and the demo base model, as `make demo` builds them (when missing);
2. candidates (`python -m prefdata.candidates`, cluster_configs/reward_data_demo.yaml): two demo generators sample
   4 videos each for 16 demo prompts on Ray rollout workers;
3. auto labels (`python -m prefdata.autolabel`): 12 pairs per prompt labelled by the vote; the pairs of a quarter of
   the prompts are set apart for people (`autolabel.people_fraction`);
4. labels through the page: the annotation server runs as users run it (`python -m prefdata.annotate serve`, its own
   process) and two scripted annotators label every pair through the page's HTTP API (they stand in for people:
   `demo-ann1` prefers the video whose colours match the references, the DEMO reward's rule, `demo-ann2` makes
   the same choice with a fifth of them flipped); then the agreement report and the export to `source: human` shards;
5. `python -m reward.train` (cluster_configs/reward_data_demo_train.yaml): a teacher trained on the human pairs
   filters the auto pairs, the model trains on both, and the held-out accuracy is printed.

Everything is under outputs/reward_data/. A rerun reuses what is there (candidates resume, the label log keeps
the annotators' labels, reward.train resumes its finished run) and prints the same numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

CONFIG = "cluster_configs/reward_data_demo.yaml"
TRAIN_CONFIG = "cluster_configs/reward_data_demo_train.yaml"
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


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=CONFIG, help="candidates + autolabel config (default: %(default)s)")
    parser.add_argument("--train-config", default=TRAIN_CONFIG, help="reward.train config (default: %(default)s)")
    parser.add_argument("--out", default="outputs/reward_data", help="where everything goes (default: %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override of the candidates/autolabel config (repeatable)")
    parser.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override of the reward.train config (repeatable)")
    args = parser.parse_args(argv)
    from data.write_shards import brace_pattern, existing_shards
    from launcher.demo import ensure_demo_model, ensure_demo_shards
    from prefdata.settings import load_prefdata_config
    from workers.run_config import load_run_config

    out = Path(args.out)
    sets = [*args.set, f"candidates.out={out}/candidates", f"autolabel.out={out}/auto"]
    cfg = load_prefdata_config(args.config, sets)
    ensure_demo_shards(cfg.candidates.prompt_shards)
    for generator in cfg.candidates.generators:
        ensure_demo_model(load_run_config(generator.config, list(generator.overrides)).model)
    step("candidates", ["-m", "prefdata.candidates", "--config", args.config, *sets])
    prefix = cfg.candidates.prefix
    candidates = brace_pattern(out / "candidates", prefix, len(existing_shards(out / "candidates", prefix)))
    step("auto labels", ["-m", "prefdata.autolabel", "--config", args.config, *sets,
                         f"autolabel.candidate_shards={candidates}", "--overwrite"])
    labelled = json.loads((out / "auto" / f"{cfg.autolabel.prefix}.autolabel.json").read_text())
    annotate(labelled["people"]["pattern"], out / "annotation")
    step("export", ["-m", "prefdata.annotate", "export", "--dir", str(out / "annotation"), "--out", str(out / "human"),
                    "--overwrite"])
    human = brace_pattern(out / "human", "human", len(existing_shards(out / "human", "human")))
    # both sets in one brace pattern, quoted (an override's value is YAML)
    step("reward model", ["-m", "reward.train", "--config", args.train_config,
                          f"data.preference_shards='{{{human},{labelled['pattern']}}}'",
                          f"trainer.output_dir={out}/reward_model", *args.train_set])
    result = json.loads((out / "reward_model" / "eval.json").read_text())
    print(f"[reward-data] held-out accuracy of the reward model: {result['accuracy_without_ties']:.3f} without ties "
          f"({result['num_without_ties']} pairs), {result['accuracy_with_ties']:.3f} with ties ({result['num_pairs']} "
          f"pairs); all under {out}/")
    return result


if __name__ == "__main__":
    main()
