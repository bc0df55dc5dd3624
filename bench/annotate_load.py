"""The annotation server under load: many annotators at once, a kill -9 mid-run, nothing acknowledged lost.

    python bench/annotate_load.py [--annotators 8 32] [--pairs 16] [--kill-after-acks 40] [--undo-rate 0.05]

For each annotator count: writes `--pairs` demo preference pairs, starts `python -m prefdata.annotate serve` (the
command users run, its own process, on loopback), and runs that many annotators at once from one asyncio client,
each as fast as the server answers: fetch the next pair, fetch its videos and reference photos, post a label (a
random choice; now and then an undo instead). Every annotator labels the same pairs in the same order, so they are
on the same pair at the same moments. The server is kill -9'ed once it has acknowledged `--kill-after-acks`
labels, with requests in flight; then every label it acknowledged must be in its log (read as a restarted server
reads it), and a restarted server's annotators go on where they stopped, to the last pair. After the run: every
acknowledged label is in the log at the sequence number the server answered, with its annotator, pair and choice;
each annotator's last record of each pair is the last one they were answered for (no label replaces another's), or
one written before the kill whose answer the kill cut off; and nothing written after the restart went unanswered.

Prints per count the requests per second and the p50 / p99 latency per kind of request of the second (full) run,
then one line per count for bench/RESULTS.md:
    annotate_load: annotators=<n> requests=<r> rps=<x> label_p50_ms=<> label_p99_ms=<> media_p50_ms=<> ...
        acknowledged=<a> ... problems=0 killed_mid_run=1
Exits 1 if any acknowledged label is missing or wrong. Not a test: numbers depend on the machine (client and
server share its cores); tests/test_prefdata_annotate.py runs it small.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prefdata.annotate_store import LabelLog  # noqa: E402

Ack = Tuple[str, str, int, str]  # (annotator, pair, seq, stored choice: a | b | tie | skip | undo)


@dataclass
class Load:
    """What the annotators got: latencies (seconds) per kind of request, the acknowledged labels, failures."""

    latency: Dict[str, List[float]] = field(default_factory=lambda: defaultdict(list))
    acks: List[Ack] = field(default_factory=list)
    unanswered: int = 0  # requests cut by the kill (never acknowledged)
    finished: int = 0  # annotators who reached the end
    seconds: float = 0.0

    def requests(self) -> int:
        return sum(len(v) for v in self.latency.values())


class Server:
    """`python -m prefdata.annotate serve` on a free loopback port."""

    def __init__(self, directory: Path, pairs: Optional[str]):
        cmd = [sys.executable, "-m", "prefdata.annotate", "serve", "--dir", str(directory), "--port", "0"]
        self.proc = subprocess.Popen(cmd + (["--pairs", pairs] if pairs else []), cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        lines = []
        for line in self.proc.stdout:
            lines.append(line)
            if "serving on " in line:
                self.base = line.split("serving on ", 1)[1].strip().rstrip("/")
                break
        else:
            raise RuntimeError("the server did not start:\n" + "".join(lines))

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(timeout=60)
        self.proc.stdout.close()


async def _annotate(client, base: str, name: str, load: Load, rng: random.Random, undo_rate: float) -> None:
    import aiohttp

    async def timed(kind: str, method: str, url: str, **kwargs):
        start = time.perf_counter()
        async with client.request(method, base + url, **kwargs) as response:
            body = await (response.json() if kind != "media" else response.read())
            if response.status != 200:
                raise RuntimeError(f"{method} {url}: {response.status} {body}")
        load.latency[kind].append(time.perf_counter() - start)
        return body

    try:
        view = await timed("next", "GET", f"/api/next?annotator={name}")
        while view["pair"] is not None:
            for url in [view["left"], view["right"], *(ref["src"] for ref in view["refs"])]:
                await timed("media", "GET", url)
            if view["can_undo"] and rng.random() < undo_rate:
                view = await timed("undo", "POST", "/api/undo", json={"annotator": name, "session": "load"})
                load.acks.append((name, view["undone"], view["saved"], "undo"))
            else:
                choice = rng.choice(["left", "right", "tie", "skip"])
                pair = view["pair"]
                view = await timed("label", "POST", "/api/label",
                                   json={"annotator": name, "session": "load", "pair": pair, "choice": choice})
                load.acks.append((name, pair, view["saved"], view["label"]))
        load.finished += 1
    except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError):
        load.unanswered += 1  # the server died under this annotator's request


async def _run(base: str, annotators: int, seed: int, undo_rate: float, kill=None) -> Load:
    import aiohttp

    load = Load()
    start = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=annotators)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as client:
        tasks = [asyncio.create_task(_annotate(client, base, f"ann{i:03d}", load, random.Random(seed * 1000 + i),
                                               undo_rate)) for i in range(annotators)]
        if kill is not None:
            while len(load.acks) < kill[0] and not all(task.done() for task in tasks):
                await asyncio.sleep(0.001)
            kill[1]()
        await asyncio.gather(*tasks)
    load.seconds = time.perf_counter() - start
    return load


def run_load(base: str, annotators: int, seed: int = 0, undo_rate: float = 0.05, kill=None) -> Load:
    """`annotators` annotators at once against the server at `base` until each has labelled every pair (or the
    server dies: `kill` = (acknowledged labels, function) kills it once that many are acknowledged)."""
    return asyncio.run(_run(base, annotators, seed, undo_rate, kill))


def check_log(directory: Path, acks: List[Ack], cut_before: int) -> List[str]:
    """What is wrong with the log against the acknowledged labels (empty: nothing). Each acknowledged label is at
    its sequence number with its annotator, pair and choice; a label the server wrote but whose answer a kill cut
    off may stand beside them, but only below `cut_before` (the log's length after the kill); and each annotator's
    last record of a pair is their last acknowledged one, or such a cut one after it: no label replaces another."""
    records = LabelLog(directory, read_only=True).records
    problems = []
    last_acked: Dict[Tuple[str, str], int] = {}
    for ack in acks:
        who, pair, seq, choice = ack
        got = records[seq] if seq < len(records) else None
        if got is None or (got["annotator"], got["pair"], got["choice"]) != (who, pair, choice):
            problems.append(f"acknowledged {ack}, log has {got}")
        last_acked[(who, pair)] = seq
    acked = {seq for _, _, seq, _ in acks}
    problems += [f"written, never acknowledged, and no kill cut it: {r}" for r in records
                 if r["seq"] >= cut_before and r["seq"] not in acked]
    last = {(r["annotator"], r["pair"]): r["seq"] for r in records}
    for key, seq in last_acked.items():
        if last[key] != seq and not (seq < last[key] < cut_before):
            problems.append(f"{key}: last acknowledged record {seq}, the log's last is {last[key]}")
    return problems


def percentile_ms(values: List[float], q: float) -> float:
    return round(float(np.percentile(values, q)) * 1000, 1) if values else float("nan")


def measure(annotators: int, num_pairs: int, kill_after_acks: int, undo_rate: float, seed: int = 0,
            work: Optional[Path] = None) -> Dict[str, object]:
    """One count: a run killed mid-way, then a restarted server's run to the end. Returns the figures and problems."""
    from data.demo import write_mixed_pairs

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(work or tmp)
        pairs = write_mixed_pairs(work / "pairs", num_pairs, sources=("auto", "synthetic"), frames=3, size=64)
        directory = work / "ann"
        server = Server(directory, pairs)
        killed = run_load(server.base, annotators, seed, undo_rate,
                          kill=(kill_after_acks, lambda: server.proc.send_signal(signal.SIGKILL)))
        server.stop(signal.SIGKILL)
        cut_before = len(LabelLog(directory, read_only=True).records)
        problems = [f"after the kill: {p}" for p in check_log(directory, killed.acks, cut_before)]
        server = Server(directory, None)
        try:
            full = run_load(server.base, annotators, seed + 1, undo_rate)
        finally:
            server.stop()
        acks = killed.acks + full.acks
        problems += [f"after the run: {p}" for p in check_log(directory, acks, cut_before)]
        if full.finished != annotators:
            problems.append(f"{annotators - full.finished} annotators did not reach the end after the restart")
        figures = {"annotators": annotators, "requests": full.requests(), "rps": round(full.requests() / full.seconds)}
        for kind in ("label", "media", "next", "undo"):
            figures[f"{kind}_p50_ms"] = percentile_ms(full.latency[kind], 50)
            figures[f"{kind}_p99_ms"] = percentile_ms(full.latency[kind], 99)
        figures.update(acknowledged=len(acks), undos=sum(ack[3] == "undo" for ack in acks),
                       acknowledged_before_kill=len(killed.acks),
                       cut_by_kill=killed.unanswered, problems=len(problems), killed_mid_run=int(killed.unanswered > 0))
        return {"figures": figures, "problems": problems}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--annotators", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--kill-after-acks", type=int, default=40)
    parser.add_argument("--undo-rate", type=float, default=0.05)
    args = parser.parse_args(argv)
    print(f"annotate_load: {os.cpu_count()} cores shared by client and server; {args.pairs} pairs")
    failed = False
    for n in args.annotators:
        result = measure(n, args.pairs, args.kill_after_acks, args.undo_rate)
        for problem in result["problems"][:20]:
            print("annotate_load: PROBLEM", problem)
        failed |= bool(result["problems"])
        print("annotate_load: " + " ".join(f"{k}={v}" for k, v in result["figures"].items()), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
