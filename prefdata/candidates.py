"""Candidate videos for preference data: N videos per prompt from each of several generators.

    python -m prefdata.candidates --config cluster_configs/reward_data_demo.yaml [candidates.key=value ...]
        [--overwrite]

A generator is a training config (its model, sampler and `workers.rollout`) with the base weights or a
checkpoint's LoRA (`checkpoint: base | latest | PATH`, resolved as `launcher.evaluate` does, the stored
config checked). For each generator in turn, the trainer's own rollout workers (workers/rollout.py, Ray
actors on that config's placement) sample `videos_per_generator` videos per prompt, with the ODE sampler
(`sampler: ode`, what the model gives at inference) or the training SDE (`sde`). Seeds derive from
(`seed`, prompt key, index), the same for every generator, so two generators' k-th videos of a prompt
start from the same noise and differ by their weights only.

Output: candidate shards `<out>/<prefix>-NNNNNN.tar` (data/SCHEMA.md, "Candidate shards"): one sample per
video with the prompt, the references and `candidate.json` recording prompt key, generator, checkpoint,
seed and sampler. `python -m prefdata.autolabel` pairs and labels them.

Resume: shards are written whole (data/write_shards.py); a rerun after a crash reads the keys of the
shards already there (headers only) and samples only what is missing, into new shards after them. The
`candidates` section is stored as `<out>/<prefix>.config.yaml` and a rerun with other settings (other than
`num_prompts`, which may grow) is refused unless `--overwrite` starts over.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
from omegaconf import OmegaConf

from config import ConfigError
from prefdata.settings import require, tool_main

log = logging.getLogger("identity_grpo.candidates")
SEED_DOMAIN = 0xCA4D_1DA7  # keeps candidate seeds apart from training's and evaluation's seed streams
IN_FLIGHT_PER_WORKER = 2  # prompts queued per rollout worker: keeps workers busy, bounds held videos


def candidate_seeds(seed: int, prompt_key: str, n: int) -> List[int]:
    """n 63-bit seeds for one prompt: a pure function of (seed, prompt key), shared by every generator."""
    digest = int.from_bytes(hashlib.sha256(prompt_key.encode("utf-8")).digest()[:8], "little")
    state = np.random.SeedSequence([SEED_DOMAIN, int(seed), digest]).generate_state(n, np.uint64)
    return [int(s >> np.uint64(1)) for s in state]


def candidate_key(prompt_key: str, generator: str, index: int) -> str:
    """`<prompt key>-<generator>-<k>` (data.schema.derived_key)."""
    from data.schema import derived_key

    return derived_key(prompt_key, f"{generator}-{index}")


def read_prompts(pattern: str, limit: Optional[int]) -> List[dict]:
    """The first `limit` (None: all) prompt samples in file order; a bad sample is an error naming it."""
    from data.reader import ShardReader

    prompts = []
    for sample in ShardReader(pattern, kind="prompt", shuffle=False, epochs=1, on_error="raise"):
        prompts.append(sample)
        if limit is not None and len(prompts) == limit:
            break
    if not prompts:
        raise ValueError(f"candidates.prompt_shards {pattern}: no prompt sample")
    return prompts


def existing_keys(out: Path, prefix: str) -> tuple[List[str], set]:
    """(shard paths, sample keys) of the candidate shards already written (tar headers only). They must be numbered
    000000 up without a gap: new shards continue the numbering, and the set is named by one brace pattern."""
    from data.tarindex import index_shard
    from data.write_shards import existing_shards, shard_name

    paths = existing_shards(out, prefix)
    for n, path in enumerate(paths):
        if Path(path).name != shard_name(prefix, n):
            raise ValueError(f"{out}: shards must be numbered from 000000 without a gap, but "
                             f"{shard_name(prefix, n)} is missing (found {Path(path).name}); pass --overwrite to "
                             "start over")
    keys = set()
    for path in paths:
        index = index_shard(path)
        bad = index.error or next((ref.error for ref in index.samples if ref.error), None)
        if bad:
            raise ValueError(f"{path}: damaged shard ({bad}); pass --overwrite to start over")
        keys.update(ref.key for ref in index.samples)
    return paths, keys


def check_resumable(section, out: Path, prefix: str, overwrite: bool, name: str = "candidates",
                    growable: Sequence[str] = ("num_prompts",)) -> tuple[int, set]:
    """(first new shard number, keys already written); with `overwrite`, the old shards are removed first. The
    section `name` is stored beside the shards; a rerun with other settings (but those in `growable`) is refused."""
    from data.write_shards import existing_shards

    stored = out / f"{prefix}.config.yaml"
    if overwrite:
        for path in existing_shards(out, prefix):  # not indexed: a damaged one goes too
            Path(path).unlink()
    paths, keys = existing_keys(out, prefix)
    mine = OmegaConf.to_container(section)
    if paths and stored.is_file():
        theirs = OmegaConf.to_container(OmegaConf.create(stored.read_text()))
        differ = sorted(k for k in set(mine) | set(theirs) if k not in growable and mine.get(k) != theirs.get(k))
        if differ:
            raise ConfigError(f"{name}.{differ[0]}: {out} holds {name} made with {differ[0]}="
                              f"{theirs.get(differ[0])!r} ({stored}), this run has {mine.get(differ[0])!r}; "
                              f"pass --overwrite to start over, or another {name}.out")
    out.mkdir(parents=True, exist_ok=True)
    stored.write_text(OmegaConf.to_yaml(section))
    return len(paths), keys


@dataclass
class Generator:
    """A generator resolved before any sampling: its config, and the LoRA file it samples with (None: the base)."""

    name: str
    config_file: str
    overrides: List[str]
    cfg: object
    lora_file: Optional[Path]


def resolve_generators(section) -> List[Generator]:
    """Every generator's config and checkpoint, checked up front; an error names `candidates.generators[i]`."""
    from evaluation.policies import EvalError, check_compatible, resolve_policy
    from workers.run_config import load_run_config

    out = []
    for i, gen in enumerate(section.generators):
        where = f"candidates.generators[{i}] ({gen.name})"
        try:
            cfg = load_run_config(gen.config, list(gen.overrides))
            spec = resolve_policy(gen.checkpoint, cfg.trainer.output_dir, gen.weights)
            check_compatible(spec, cfg)
        except (ConfigError, EvalError, FileNotFoundError) as err:
            raise ConfigError(f"{where}: {err}".replace("--checkpoint", "checkpoint")) from None
        out.append(Generator(gen.name, gen.config, list(gen.overrides), cfg, spec.lora_file))
    return out


def generate(section, generators: Sequence[Generator], prompts: Sequence[dict],
             done: set) -> Iterator[tuple[str, dict, dict, bytes, dict]]:
    """(key, prompt sample, candidate.json, mp4 bytes, video info) of every missing candidate, generator by
    generator, each on its own rollout workers (created, used, released)."""
    import ray

    from evaluation.policies import read_lora
    from workers.group import plan_pool, release
    from workers.rollout import rollout_group

    n = section.videos_per_generator
    for gen in generators:
        todo = [p for p in prompts if any(candidate_key(p["key"], gen.name, k) not in done for k in range(n))]
        if not todo:
            log.info("generator %s: all %d prompts done", gen.name, len(prompts))
            continue
        cfg = gen.cfg
        placement = plan_pool(cfg.workers, "rollout", device_is_gpu=cfg.trainer.device.startswith("cuda"))
        group = rollout_group(f"candidates-{gen.name}", placement, cfg)
        try:
            # A LoRA generator samples with version 1; a worker Ray restarts mid-call fetches it again (weights_box),
            # so no video is ever sampled with the initial adapters and written under this generator's name.
            version, box = (None, None) if gen.lora_file is None else (1, [ray.put(read_lora(gen.lora_file))])
            if box is not None:  # the ref as a top-level argument: Ray hands each worker the stored value
                ray.get(group.run("set_weights", version, box[0]))
            log.info("generator %s (%s, %s): %d prompts x %d videos on %d rollout worker(s)", gen.name, gen.config_file,
                     gen.lora_file or "base", len(todo), n, len(group))
            checkpoint = "base" if gen.lora_file is None else str(gen.lora_file)

            def submit(actor, item, version=version, box=box):
                prompt, seeds = item
                return actor.candidate_videos.remote({"prompt": prompt["prompt"], "refs": prompt["refs"]}, seeds,
                                                     section.sampler == "ode", section.fps, version, box)

            items = ((prompt, candidate_seeds(section.seed, prompt["key"], n)) for prompt in todo)
            for (prompt, seeds), videos in group.map_ordered(items, submit, IN_FLIGHT_PER_WORKER):
                for k, (video, info) in enumerate(videos):
                    candidate = {"prompt_key": prompt["key"], "generator": gen.name, "checkpoint": checkpoint,
                                 "seed": seeds[k], "sampler": section.sampler,
                                 "extra": {"config": gen.config_file, "overrides": gen.overrides, "index": k}}
                    key = candidate_key(prompt["key"], gen.name, k)
                    if key not in done:
                        yield key, prompt, candidate, video, info
        finally:
            group.kill()
            release({"rollout": placement})


def run(cfg, overwrite: bool = False) -> Dict[str, object]:
    """Write the missing candidates; returns {pattern, written, skipped_existing, shards}."""
    import ray

    from data.schema import candidate_members, make_meta
    from data.video import VideoInfo
    from data.write_shards import ShardWriter
    from workers.ray_cluster import connect_ray

    section = cfg.candidates
    require(section, "candidates")
    if not section.generators:
        raise ConfigError("candidates.generators: needs at least one generator {name, config, checkpoint}")
    out = Path(section.out)
    generators = resolve_generators(section)
    prompts = read_prompts(section.prompt_shards, section.num_prompts)
    first_shard, done = check_resumable(section, out, section.prefix, overwrite)
    started = connect_ray(generators[0].cfg)
    written = 0
    try:
        with ShardWriter(out, section.prefix, section.samples_per_shard, first_index=first_shard) as writer:
            for key, prompt, candidate, video, info in generate(section, generators, prompts, done):
                meta = make_meta(prompt["meta"]["num_people"], prompt["meta"]["identity_ids"],
                                 prompt["meta"]["source"], {"video": VideoInfo(**info)}, prompt["meta"]["extra"])
                writer.write(key, candidate_members(prompt["prompt"], prompt["refs"], video, candidate, meta))
                written += 1
    finally:
        if started:
            ray.shutdown()
    total = len(section.generators) * section.videos_per_generator * len(prompts)
    pattern = writer.pattern if first_shard + len(writer.paths) else None
    print(f"candidates: wrote {written} videos ({total - written} already there) in {len(writer.paths)} new "
          f"shard(s): {pattern}")
    return {"pattern": pattern, "written": written, "skipped_existing": total - written, "shards": writer.paths}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    return tool_main(run, __doc__, "candidates", "remove the candidate shards there and start over", argv)


if __name__ == "__main__":
    main()
    sys.exit(0)
