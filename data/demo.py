"""Small demo dataset from real face photographs (`python -m data.demo --out outputs/demo_data`).

Writes `prompts-{000000..000001}.tar` (one to three people per sample, one reference image per
person, varied prompts) and `pairs-{000000..000001}.tar` (synthetic preference pairs: a clean clip
in which each person's face moves slightly over a real background photograph, against one of the
four distortions of data/distort.py). These are the paths DataConfig's defaults point at.

Why real photographs: the face reward and the identity reward model need real faces to mean
anything; the three identities are the only usable real face photos shipped in installed packages
(see data/faces.py for the search and its limits). Everything is seeded, so the same arguments
give byte-identical shards, in a second or two.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data.distort import CleanClip, DistortionConfig, write_pairs
from data.faces import crop_face, load_face_photos
from data.schema import DISTORTION_KINDS, make_meta, prompt_members
from data.video import resize_center_crop
from data.write_shards import ShardWriter, brace_pattern

SINGLE_ACTIONS = ["walks slowly toward the camera", "smiles and looks around", "reads a book",
                  "drinks a cup of coffee", "turns to look over the shoulder", "waves at someone off screen"]
GROUP_ACTIONS = ["talk to each other", "walk side by side", "laugh together", "shake hands",
                 "look at the camera", "sit at a table and share a meal"]
PLACES = ["in a sunny park", "in a busy kitchen", "on a city street at night", "in a quiet library",
          "on a beach at sunset", "in a snowy forest", "inside a spaceship cabin"]
STYLES = ["cinematic lighting", "handheld camera", "soft morning light", "35mm film look", "slow motion"]


def background_photos() -> list[np.ndarray]:
    """Real photographs without people (scikit-image sample data) used as clip backgrounds."""
    from skimage import data

    return [data.coffee(), data.rocket(), np.repeat(data.brick()[:, :, None], 3, axis=2), data.hubble_deep_field()]


def make_prompt(rng: np.random.Generator, descriptions: Sequence[str]) -> str:
    """A varied text prompt naming each person by appearance (templates x actions x places x styles)."""
    people = list(descriptions)
    who = people[0] if len(people) == 1 else ", ".join(people[:-1]) + " and " + people[-1]
    action = rng.choice(SINGLE_ACTIONS if len(people) == 1 else GROUP_ACTIONS)
    text = f"{who} {action} {rng.choice(PLACES)}, {rng.choice(STYLES)}"
    return text[0].upper() + text[1:]


def compose_clip(faces: Sequence[np.ndarray], background: np.ndarray, num_frames: int, height: int, width: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paste each face on the background, side by side, drifting a few pixels over the frames.

    Returns (video uint8 (F, H, W, 3), boxes int (F, P, 4) x0 y0 x1 y1): the box of person p in
    frame t is exactly where their face was pasted, which is what the distortions edit.
    """
    p = len(faces)
    size = int(min(0.8 * width / p, 0.7 * height))
    if size < 8:
        raise ValueError(f"{width}x{height} frames are too small for {p} faces")
    bg = resize_center_crop(background, height, width)
    patches = [resize_center_crop(face, size, size) for face in faces]
    amp = max(1, size // 12)
    phases = rng.uniform(0, 2 * np.pi, size=(p, 2))
    video = np.repeat(bg[None], num_frames, axis=0)
    boxes = np.zeros((num_frames, p, 4), dtype=np.int64)
    for t in range(num_frames):
        for i in range(p):
            cx = (i + 0.5) * width / p + amp * np.sin(2 * np.pi * t / num_frames + phases[i, 0])
            cy = 0.45 * height + amp * np.cos(2 * np.pi * t / num_frames + phases[i, 1])
            x0 = int(np.clip(round(cx - size / 2), 0, width - size))
            y0 = int(np.clip(round(cy - size / 2), 0, height - size))
            video[t, y0 : y0 + size, x0 : x0 + size] = patches[i]
            boxes[t, i] = (x0, y0, x0 + size, y0 + size)
    return video, boxes


def build_demo(out: str | Path, num_prompts: int = 16, num_pairs: int = 16, samples_per_shard: int = 8,
               num_frames: int = 9, height: int = 96, width: int = 160, ref_size: int = 128,
               seed: int = 0) -> tuple[str, str]:
    """Write the demo prompt and preference shards; returns their two brace patterns."""
    photos = load_face_photos()
    refs = [crop_face(ph.image, ph.face_box, margin=0.5, size=ref_size) for ph in photos]
    tight = [crop_face(ph.image, ph.face_box, margin=0.15, size=96) for ph in photos]
    backgrounds = background_photos()
    out = Path(out)

    with ShardWriter(out, "prompts", samples_per_shard) as writer:
        for i in range(num_prompts):
            rng = np.random.default_rng([seed, 0, i])
            ids = [int(j) for j in rng.permutation(len(photos))[: 1 + i % min(3, len(photos))]]
            meta = make_meta(len(ids), [photos[j].identity_id for j in ids], "demo",
                             extra={"photo_sources": [photos[j].source for j in ids]})
            prompt = make_prompt(rng, [photos[j].description for j in ids])
            writer.write(f"prompt{i:05d}", prompt_members(prompt, [refs[j] for j in ids], meta))
    prompt_pattern = writer.pattern

    clips, kinds = [], []
    for i in range(num_pairs):
        rng = np.random.default_rng([seed, 1, i])
        order = [int(j) for j in rng.permutation(len(photos))]
        ids, outsiders = order[: 1 + i % min(3, len(photos))], order[1 + i % min(3, len(photos)):]
        video, boxes = compose_clip([tight[j] for j in ids], backgrounds[i % len(backgrounds)],
                                    num_frames, height, width, rng)
        clips.append(CleanClip(f"pair{i:05d}", make_prompt(rng, [photos[j].description for j in ids]), video,
                               boxes, [tight[j] for j in ids + outsiders], [refs[j] for j in ids],
                               [photos[j].identity_id for j in ids], [photos[j].identity_id for j in outsiders],
                               source="demo"))
        kind = DISTORTION_KINDS[i % len(DISTORTION_KINDS)]
        kinds.append(kind if kind != "exchange" or len(ids) > 1 else "swap")
    paths = write_pairs(clips, str(out), "pairs", seed=seed, cfg=DistortionConfig(),
                        max_samples_per_shard=samples_per_shard, kinds=kinds)
    return prompt_pattern, brace_pattern(out, "pairs", len(paths))


def write_demo_clips(out: str | Path, num_clips: int, num_frames: int = 9, height: int = 96, width: int = 160,
                     max_people: int = 2, seed: int = 0, with_camera: bool = False) -> list[np.ndarray]:
    """A folder of clip folders (data/SCHEMA.md, "Clips": prompt.txt, ref_<k>.png, video.mp4, meta.json) of real
    faces composited on real backgrounds: stand-ins for footage, with known face boxes, for
    `python -m prefdata.distortion_pairs`. Clip i has 1 + i % max_people people. with_camera: the cameraman (in
    profile: dlib's frontal detector misses him) may be one of them; without, only the two frontal faces.
    Returns each clip's true boxes (F, P, 4), also in its meta.json (extra.true_boxes)."""
    import json

    from data.video import encode_png, encode_video

    photos = [p for p in load_face_photos() if with_camera or p.detected]
    refs = [crop_face(p.image, p.face_box, margin=0.5, size=128) for p in photos]
    tight = [crop_face(p.image, p.face_box, margin=0.15, size=96) for p in photos]
    backgrounds = background_photos()
    truths = []
    for i in range(num_clips):
        rng = np.random.default_rng([seed, 2, i])
        ids = [int(j) for j in rng.permutation(len(photos))[: 1 + i % max_people]]
        video, boxes = compose_clip([tight[j] for j in ids], backgrounds[i % len(backgrounds)], num_frames, height,
                                    width, rng)
        order = [int(k) for k in rng.permutation(len(ids))]  # references in another order than left to right
        folder = Path(out) / f"clip{i:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "prompt.txt").write_text(make_prompt(rng, [photos[ids[k]].description for k in order]))
        for n, k in enumerate(order):
            (folder / f"ref_{n}.png").write_bytes(encode_png(refs[ids[k]]))
        (folder / "video.mp4").write_bytes(encode_video(video))
        truth = boxes[:, order]
        (folder / "meta.json").write_text(json.dumps({"identity_ids": [photos[ids[k]].identity_id for k in order],
                                                      "source": "demo", "extra": {"true_boxes": truth.tolist()}}))
        truths.append(truth)
    return truths


def write_mixed_pairs(out: str | Path, n: int, sources: Sequence[str] = ("synthetic",), flip_auto: float = 0.0,
                      frames: int = 2, size: int = 56, max_people: int = 2, seed: int = 0,
                      min_severity: float = 0.6) -> str:
    """n synthetic-distortion pairs (a clean clip of 1..max_people real faces against a distorted one) whose
    label source cycles through `sources` (human / auto / synthetic), with an `auto` label flipped with
    probability `flip_auto` (noisy voting): data for the reward trainer's pools, curriculum and teacher
    filter (its tests and `launcher.rehearse`). Returns the shards' brace pattern."""
    import json

    from data.distort import make_pair

    photos = load_face_photos()
    refs = [crop_face(p.image, p.face_box, margin=0.5, size=size) for p in photos]
    faces = [crop_face(p.image, p.face_box, margin=0.15, size=48) for p in photos]
    backgrounds = background_photos()
    cfg = DistortionConfig(min_severity=min_severity)
    with ShardWriter(out, "pairs", 32) as writer:
        for i in range(n):
            rng = np.random.default_rng([seed, i])
            order = [int(j) for j in rng.permutation(len(photos))]
            k = 1 + i % max_people
            video, boxes = compose_clip([faces[j] for j in order[:k]], backgrounds[i % len(backgrounds)], frames,
                                        size, size, rng)
            clip = CleanClip(f"pair{i:05d}", make_prompt(rng, [photos[j].description for j in order[:k]]), video,
                             boxes, [faces[j] for j in order], [refs[j] for j in order[:k]],
                             [photos[j].identity_id for j in order[:k]], [photos[j].identity_id for j in order[k:]])
            members, _ = make_pair(clip, rng, cfg)
            label = json.loads(members["label.json"])
            label["source"] = sources[i % len(sources)]
            if label["source"] == "auto" and rng.random() < flip_auto:
                label["preference"] = "b" if label["preference"] == "a" else "a"
            members["label.json"] = json.dumps(label).encode()
            writer.write(clip.key, members)
    return brace_pattern(out, "pairs", len(writer.paths))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data.demo", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder (DataConfig default: outputs/demo_data)")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--num-pairs", type=int, default=16)
    p.add_argument("--samples-per-shard", type=int, default=8)
    p.add_argument("--num-frames", type=int, default=9)
    p.add_argument("--height", type=int, default=96)
    p.add_argument("--width", type=int, default=160)
    p.add_argument("--ref-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    prompts, pairs = build_demo(a.out, a.num_prompts, a.num_pairs, a.samples_per_shard, a.num_frames,
                                a.height, a.width, a.ref_size, a.seed)
    print(f"demo prompt shards: {prompts}\ndemo preference shards: {pairs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
