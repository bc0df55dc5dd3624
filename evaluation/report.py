"""Evaluation report: Markdown with tables, PNG plots and a base-vs-fine-tuned video grid.

Written by `python -m launcher.evaluate` into `<out>/` (default `<trainer.output_dir>/eval/`):
    report.md                 metric tables per policy, paired comparison (deltas, 95% CIs, win rates),
                              breakdowns by number of people and by identity, links to the files below
    training_curves.png       from `<trainer.output_dir>/metrics.jsonl`: training reward (total and per
                              component), held-out monitor metrics (`heldout_*`), KL, over steps
    identity_similarity.png   per identity id, the distribution of its face similarity over samples, per policy
    video_grid.png / .mp4     per prompt: the reference photos, then the same seed's video from each policy
                              (the PNG shows a few frames of each; the mp4 plays them side by side)
The same images go to TensorBoard (`<trainer.output_dir>/tb`, tags `eval/...`), with each metric's
mean as scalar `eval/<metric>` at the evaluated checkpoint's step, so a series of evaluations draws a curve.

Plots use matplotlib's object API on the Agg canvas (no pyplot state, no display needed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

CELL = 128  # pixel height of one image in the grid
GAP = 4
FRAMES_IN_GRID = 4


@dataclass
class EvalRun:
    tag: str
    source: str
    step: int
    records: List[dict]
    summary: dict
    kept: Dict[str, np.ndarray] = field(default_factory=dict)  # prompt key -> (K, F, H, W, 3) uint8


# ----------------------------------------------------------------------------- plots


def _figure(rows: int = 1, cols: int = 1, width: float = 6.0, height: float = 3.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * cols, height * rows), dpi=100)
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(rows, cols, i + 1) for i in range(rows * cols)]


def _render(fig) -> np.ndarray:
    fig.tight_layout()
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def _series(records: Sequence[dict], key: str):
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and np.isfinite(r[key])]
    return [p[0] for p in points], [p[1] for p in points]


def plot_training(records: Sequence[dict], trained_names: Sequence[str] = ()):
    """Reward, held-out metrics and KL over steps; None when the records hold none of them."""
    keys = set().union(*(r.keys() for r in records)) if records else set()
    rewards = sorted(k for k in keys if k.startswith("reward_") and k not in ("reward_std", "reward_failed"))
    heldout = sorted(k for k in keys if k.startswith("heldout_") and k != "heldout_failed")
    panels = [p for p in (("training reward", rewards), ("held-out prompts", heldout),
                          ("KL to reference", ["kl"] if "kl" in keys else [])) if p[1]]
    if not panels:
        return None
    fig, axes = _figure(len(panels), 1, width=7.0, height=2.8)
    for ax, (title, names) in zip(axes, panels, strict=True):
        for name in names:
            steps, values = _series(records, name)
            metric = name.removeprefix("heldout_")
            dashed = name.startswith("heldout_") and (metric == "reward_total" or metric == "vlm" and "vlm" in
                                                      trained_names or metric.removeprefix("reward_") in trained_names)
            ax.plot(steps, values, "--" if dashed else "-", marker="." if len(steps) < 30 else None, label=name)
        if title == "training reward" and "reward_mean" in names:
            steps, mean = _series(records, "reward_mean")
            _, std = _series(records, "reward_std")
            if len(std) == len(mean):
                ax.fill_between(steps, np.subtract(mean, std), np.add(mean, std), alpha=0.15)
        ax.set_title(title + (" (dashed: rewards trained on)" if title == "held-out prompts" else ""), fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    return fig


def plot_identity_similarity(runs: Sequence[EvalRun]):
    """Box plot per identity id of its per-sample face similarity, one box per policy side by side."""
    per: Dict[str, Dict[str, List[float]]] = {}
    for run in runs:
        for r in run.records:
            for ident, sim in zip(r["identity_ids"], r.get("face_per_identity") or [], strict=False):
                if sim is not None and np.isfinite(sim):
                    per.setdefault(ident, {}).setdefault(run.tag, []).append(sim)
    fig, (ax,) = _figure(1, 1, width=max(6.0, 1.6 * len(per) * len(runs)), height=3.6)
    if not per:
        ax.text(0.5, 0.5, "no face similarity (every sample failed)", ha="center", va="center")
        return fig
    idents, width = sorted(per), 0.8 / len(runs)
    for j, run in enumerate(runs):
        data = [per[i].get(run.tag, []) for i in idents]
        pos = [x - 0.4 + width * (j + 0.5) for x in range(len(idents))]
        kept = [(p, d) for p, d in zip(pos, data, strict=True) if d]
        parts = ax.boxplot([d for _, d in kept], positions=[p for p, _ in kept], widths=width * 0.9,
                           patch_artist=True, manage_ticks=False)
        color = f"C{j}"
        for box in parts["boxes"]:
            box.set(facecolor=color, alpha=0.35, edgecolor=color)
        rng = np.random.default_rng(j)  # fixed jitter: the same data draws the same plot
        for p, d in kept:
            ax.scatter(p + rng.uniform(-width / 4, width / 4, len(d)), d, s=8, color=color, zorder=3)
        ax.plot([], [], "s", color=color, alpha=0.5, label=run.tag)
    ax.set_xticks(range(len(idents)), idents, fontsize=8)
    ax.set_ylabel("face similarity (cosine)")
    ax.set_title("per-identity face similarity to the reference, over samples", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return fig


# ----------------------------------------------------------------------------- video grid


def _fit(image: np.ndarray, height: int = CELL, square: bool = False) -> np.ndarray:
    im = Image.fromarray(np.asarray(image, dtype=np.uint8))
    width = height if square else max(1, round(im.width * height / im.height))
    small = im.height < height // 2  # tiny CPU videos: show the pixels, do not blur them
    return np.asarray(im.resize((width, height), Image.NEAREST if small else Image.BILINEAR))


def _hstack(cells: Sequence[np.ndarray], gaps: Sequence[int]) -> np.ndarray:
    parts = []
    for cell, gap in zip(cells, gaps, strict=True):
        parts += [cell, np.full((cell.shape[0], gap, 3), 255, np.uint8)]
    return np.concatenate(parts[:-1], axis=1)


def _text_band(width: int, items: Sequence[tuple], height: int = 14) -> np.ndarray:
    band = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(band)
    for x, text in items:
        draw.text((x + 2, 1), text, fill=(0, 0, 0))
    return np.asarray(band)


def _grid_row(prompt: dict, runs: Sequence[EvalRun], num_refs: int, frame_index=None) -> tuple:
    """One prompt's cells (refs, then each policy's frames of seed 0) and where each group starts."""
    refs = [_fit(r, square=True) for r in prompt["refs"]]
    refs += [np.full((CELL, CELL, 3), 255, np.uint8)] * (num_refs - len(refs))
    cells, gaps, starts = list(refs), [1] * len(refs), [(0, "references")]
    gaps[-1] = 3 * GAP
    from data.video import sample_frame_indices

    for run in runs:
        video = run.kept[prompt["key"]][0]
        idx = sample_frame_indices(len(video), FRAMES_IN_GRID) if frame_index is None else [frame_index]
        starts.append((sum(c.shape[1] for c in cells) + sum(gaps), run.tag))
        frames = [_fit(video[t]) for t in idx]
        cells += frames
        gaps += [1] * (len(frames) - 1) + [3 * GAP]
    return cells, gaps, starts


def contact_sheet(prompts: Sequence[dict], runs: Sequence[EvalRun]) -> np.ndarray:
    """PNG-able uint8 image: per prompt a text line, then references | policy A frames | policy B frames."""
    num_refs = max(len(p["refs"]) for p in prompts)
    blocks = []
    for i, prompt in enumerate(prompts):
        cells, gaps, starts = _grid_row(prompt, runs, num_refs)
        row = _hstack(cells, gaps)
        if i == 0:
            blocks.append(_text_band(row.shape[1], starts))
        text = f"{prompt['key']}: {prompt['prompt']}"
        blocks += [_text_band(row.shape[1], [(0, text[: row.shape[1] // 6])]), row,
                   np.full((GAP, row.shape[1], 3), 255, np.uint8)]
    return np.concatenate(blocks, axis=0)


def grid_video(prompts: Sequence[dict], runs: Sequence[EvalRun]) -> np.ndarray:
    """(F, H, W, 3) uint8: every frame shows each prompt's references and its videos side by side."""
    num_refs = max(len(p["refs"]) for p in prompts)
    num_frames = min(len(run.kept[p["key"]][0]) for run in runs for p in prompts)
    frames = []
    for t in range(num_frames):
        rows = []
        for prompt in prompts:
            cells, gaps, _ = _grid_row(prompt, runs, num_refs, frame_index=t)
            rows += [_hstack(cells, gaps), None]
        width = rows[0].shape[1]
        rows = [r if r is not None else np.full((GAP, width, 3), 255, np.uint8) for r in rows[:-1]]
        frame = np.concatenate(rows, axis=0)
        frames.append(np.pad(frame, ((0, frame.shape[0] % 2), (0, frame.shape[1] % 2), (0, 0)), constant_values=255))
    return np.stack(frames)


# ----------------------------------------------------------------------------- markdown


def _fmt(x, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def markdown(runs: Sequence[EvalRun], comparison: Optional[dict], images: Dict[str, str], notes: Sequence[str]) -> str:
    setup = runs[0].summary
    lines = ["# Evaluation report", "",
             f"{setup['num_prompts']} prompts from `{setup['prompt_shards']}`, {len(setup['seeds'])} seed(s) "
             "per prompt "
             f"(the same for every policy), deterministic sampler, {setup['num_steps']} steps, guidance "
             f"{setup['guidance_scale']}. Training reward weights: `{setup['reward_weights']}`.", "",
             "| policy | source | step | samples |", "|---|---|---|---|"]
    lines += [f"| {r.tag} | `{r.source}` | {r.step} | {r.summary['samples']} |" for r in runs]
    names = list(dict.fromkeys(n for r in runs for n in r.summary["metrics"]))
    lines += ["", "## Metrics (mean ± std over samples; failed values excluded and counted)", "",
              "| metric | " + " | ".join(r.tag for r in runs) + " |", "|---" * (len(runs) + 1) + "|"]
    for name in names:
        cells = []
        for r in runs:
            m = r.summary["metrics"].get(name)
            cells.append("n/a" if m is None or m["mean"] is None else
                         f"{m['mean']:.4f} ± {m['std']:.4f}" + (f" ({m['failed']} failed)" if m["failed"] else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if comparison is not None:
        c = comparison
        lines += ["", f"## {c['candidate']} vs {c['baseline']} (paired over {c['pairs']} samples)", "",
                  f"Delta = {c['candidate']} - {c['baseline']}; {int(c['confidence'] * 100)}% interval from "
                  f"{c['num_resamples']} bootstrap resamples of prompts; * = interval excludes 0.", "",
                  "| metric | " + f"{c['candidate']} | {c['baseline']} | delta | CI |", "|---|---|---|---|---|"]
        for name, d in c["deltas"].items():
            star = " *" if d["significant"] else ""
            lines.append(f"| {name} | {_fmt(d['candidate'])} | {_fmt(d['baseline'])} | {_fmt(d['delta'])}{star} | "
                         f"[{_fmt(d['ci_low'])}, {_fmt(d['ci_high'])}] |")
        lines += ["", f"Win rate of {c['candidate']} (ties count half):", "",
                  "| by | win rate | CI | wins / ties / losses |", "|---|---|---|---|"]
        for name, w in c["win_rates"].items():
            lines.append(f"| {name} | {_fmt(w['win_rate'], 3)} | [{_fmt(w['ci_low'], 3)}, {_fmt(w['ci_high'], 3)}] | "
                         f"{w['wins']} / {w['ties']} / {w['losses']} |")
    lines += ["", "## By number of people", "", "| policy | people | samples | face_mean | face_min | found_frac |",
              "|---|---|---|---|---|---|"]
    for r in runs:
        for n, b in r.summary["by_num_people"].items():
            lines.append(f"| {r.tag} | {n} | {b['samples']} | {_fmt(b.get('face_mean'))} | {_fmt(b.get('face_min'))} "
                         f"| {_fmt(b.get('face_found_frac'))} |")
    lines += ["", "## Per identity (face similarity)", "", "| policy | identity | mean | min | n |",
              "|---|---|---|---|---|"]
    for r in runs:
        for ident, s in r.summary["per_identity"].items():
            lines.append(f"| {r.tag} | {ident} | {_fmt(s['mean'])} | {_fmt(s['min'])} | {s['n']} |")
    lines += ["", "## Plots and videos", ""]
    lines += [f"![{title}]({name})" if name.endswith(".png") else f"- [{title}]({name})"
              for title, name in images.items()]
    lines += ["", *[f"- {n}" for n in notes], ""]
    return "\n".join(lines)


def summary_lines(runs: Sequence[EvalRun], comparison: Optional[dict]) -> List[str]:
    """A few lines for the terminal."""
    out = []
    for r in runs:
        parts = [f"{n}={_fmt(m['mean'])}" for n, m in r.summary["metrics"].items()]
        out.append(f"{r.tag}: " + " ".join(parts))
    if comparison is not None:
        for n, w in comparison["win_rates"].items():
            d = comparison["deltas"][n]
            out.append(f"{comparison['candidate']} vs {comparison['baseline']} {n}: delta {_fmt(d['delta'])} "
                       f"[{_fmt(d['ci_low'])}, {_fmt(d['ci_high'])}], win rate {_fmt(w['win_rate'], 3)}")
    return out


# ----------------------------------------------------------------------------- all of it


def write_report(out: Path, runs: Sequence[EvalRun], comparison: Optional[dict], grid_prompts: Sequence[dict],
                 output_dir: Path, trained_names: Sequence[str] = (), tb_dir: Optional[Path] = None) -> Path:
    """Write the files listed in the module doc; returns the path of report.md."""
    from data.video import encode_video
    from runtime.metrics import read_metrics

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images: Dict[str, str] = {}
    arrays: Dict[str, np.ndarray] = {}
    notes = []
    metrics_path = Path(output_dir) / "metrics.jsonl"
    if metrics_path.is_file():
        fig = plot_training(read_metrics(output_dir), trained_names)
        if fig is not None:
            arrays["training_curves"] = _render(fig)
    else:
        notes.append(f"no training metrics at `{metrics_path}`: training curves skipped")
    arrays["identity_similarity"] = _render(plot_identity_similarity(runs))
    grid_prompts = [p for p in grid_prompts if all(p["key"] in r.kept for r in runs)]
    if grid_prompts:
        arrays["video_grid"] = contact_sheet(grid_prompts, runs)
        (out / "video_grid.mp4").write_bytes(encode_video(grid_video(grid_prompts, runs), fps=8))
    for name, array in arrays.items():
        Image.fromarray(array).save(out / f"{name}.png")
        images[name.replace("_", " ")] = f"{name}.png"
    if grid_prompts:
        images["video grid (mp4)"] = "video_grid.mp4"
    if tb_dir is not None:
        _to_tensorboard(tb_dir, runs, arrays)
        notes.append(f"plots and metric means also in TensorBoard at `{tb_dir}` (tags `eval/...`)")
    path = out / "report.md"
    path.write_text(markdown(runs, comparison, images, notes))
    return path


def _to_tensorboard(tb_dir: Path, runs: Sequence[EvalRun], arrays: Dict[str, np.ndarray]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tb_dir))
    try:
        for name, array in arrays.items():
            writer.add_image(f"eval/{name}", array, runs[0].step, dataformats="HWC")
        for run in runs:
            for metric, m in run.summary["metrics"].items():
                if m["mean"] is not None:
                    writer.add_scalar(f"eval/{metric}", m["mean"], run.step)
    finally:
        writer.close()
