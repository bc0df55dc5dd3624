"""The annotation page (prefdata/annotate.py, prefdata/annotate_store.py): a real server process driven over HTTP and
by a real headless browser (Debian's chromium + chromedriver, via selenium); durability under kill -9; the agreement
report and the export to preference shards."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from data.reader import ShardReader
from prefdata.annotate_store import LabelLog, PairSet, cohen_kappa, export, left_slot, open_task, report

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """8 small preference pairs: half labelled `auto`, half `synthetic` (their stored labels are known)."""
    from data.demo import write_mixed_pairs

    return write_mixed_pairs(tmp_path_factory.mktemp("pairs"), 8, sources=("auto", "synthetic"), frames=3, size=64)


class Server:
    """`python -m prefdata.annotate serve` in its own process (the command users run), on a free port."""

    def __init__(self, directory, pairs=None, *extra):
        cmd = [sys.executable, "-m", "prefdata.annotate", "serve", "--dir", str(directory), "--port", "0", *extra]
        cmd += ["--pairs", pairs] if pairs else []
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines = []
        deadline = time.time() + 60
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            if "serving on " in line:
                self.url = line.split("serving on ", 1)[1].strip()
                self.base = self.url.split("?")[0].rstrip("/")
                threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # keep the pipe drained
                return
        self.proc.kill()
        raise AssertionError("server did not start:\n" + "".join(self.lines))

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)


@pytest.fixture
def serve():
    """Starts `Server`s for one test; teardown stops every one of them, whether the test passed, failed or skipped."""
    started = []

    def start(*args):
        started.append(Server(*args))
        return started[-1]

    yield start
    for server in started:
        server.stop(signal.SIGKILL)


def post(base, **body):
    return requests.post(f"{base}/api/label", json=body, timeout=10)


def _assert_plays_in_every_browser(served: bytes, stored: bytes) -> None:
    """The served video is the stored one re-encoded to H.264 4:2:0: same frames, size and rate, close pixels."""
    import io

    import av
    import numpy as np

    from data.video import decode_video_with_info

    with av.open(io.BytesIO(stored)) as c:
        assert c.streams.video[0].format.name == "yuv444p"  # what the shards hold (else this checks nothing)
    with av.open(io.BytesIO(served)) as c:
        stream = c.streams.video[0]
        assert (stream.codec_context.name, stream.format.name) == ("h264", "yuv420p")
    got, got_info = decode_video_with_info(served)
    want, want_info = decode_video_with_info(stored)
    assert got_info == want_info
    assert np.abs(got.astype(np.int16) - want).mean() < 6.0  # measured 3.3-3.6 (chroma at half size); unrelated: ~70


def test_display_original_serves_the_stored_bytes(tmp_path, pairs, serve):
    server = serve(tmp_path / "ann", pairs, "--display", "original")
    try:
        view = requests.get(f"{server.base}/api/next", params={"annotator": "bob"}, timeout=10).json()
        served = requests.get(server.base + view["left"], timeout=10).content
        assert served == PairSet.open(pairs).members(view["pair"])[view["left"].rsplit("/", 1)[1]]
    finally:
        server.stop()


def test_api_serves_pairs_and_rejects_malformed_requests(tmp_path, pairs, serve):
    server = serve(tmp_path / "ann", pairs)
    try:
        base = server.base
        view = requests.get(f"{base}/api/next", params={"annotator": "alice"}, timeout=10).json()
        assert view["pair"] == "pair00000" and view["total"] == 8 and view["labelled"] == 0
        left = left_slot("pair00000", "alice")
        assert view["left"].endswith(f"/{left}.mp4") and view["right"].endswith(f"/{'b' if left == 'a' else 'a'}.mp4")
        video = requests.get(base + view["left"], timeout=10)
        assert video.status_code == 200 and video.headers["Content-Type"] == "video/mp4"
        assert video.content[4:8] == b"ftyp" and video.headers["Accept-Ranges"] == "bytes"
        _assert_plays_in_every_browser(video.content, PairSet.open(pairs).members("pair00000")[f"{left}.mp4"])
        part = requests.get(base + view["left"], headers={"Range": "bytes=10-109"}, timeout=10)
        assert part.status_code == 206 and part.content == video.content[10:110]
        assert part.headers["Content-Range"] == f"bytes 10-109/{len(video.content)}"
        tail = requests.get(base + view["left"], headers={"Range": "bytes=-20"}, timeout=10)
        assert tail.status_code == 206 and tail.content == video.content[-20:]
        beyond = requests.get(base + view["left"], headers={"Range": f"bytes={len(video.content) + 5}-"}, timeout=10)
        assert beyond.status_code == 416 and beyond.headers["Content-Range"] == f"bytes */{len(video.content)}"
        saved = post(base, annotator="alice", session="s1", pair="pair00000", choice="right").json()
        assert saved["label"] == ("b" if left == "a" else "a")
        assert saved["pair"] == "pair00001" and saved["labelled"] == 1

        def refused(response, status, words):
            assert response.status_code == status, response.text
            assert all(w in response.json()["error"] for w in words), response.json()

        as_json = {"Content-Type": "application/json"}
        refused(requests.post(f"{base}/api/label", data=b"{not json", headers=as_json, timeout=10), 400,
                ["body", "not JSON"])
        refused(requests.post(f"{base}/api/label", json=[1], timeout=10), 400, ["JSON object"])
        refused(post(base, annotator="alice", session="s1", pair="pair00000", choice="up"), 400, ["choice", "'up'"])
        refused(post(base, annotator="alice", session="s1", pair="nope", choice="tie"), 404, ["pair", "'nope'"])
        refused(post(base, annotator="a b", session="s1", pair="pair00000", choice="tie"), 400, ["annotator"])
        refused(post(base, annotator="alice", session="", pair="pair00000", choice="tie"), 400, ["session"])
        refused(post(base, annotator="alice", session="s", pair="pair00000", choice="tie", x=1), 400, ["x: unknown"])
        refused(requests.get(f"{base}/api/next", timeout=10), 400, ["annotator"])
        refused(post(base, annotator="alice", session="s1", pair="pair00000", choice=["left"]), 400, ["choice"])
        label = {"annotator": "mallory", "session": "s", "pair": "pair00000", "choice": "tie"}
        refused(requests.post(f"{base}/api/label", data=json.dumps(label), headers={"Content-Type": "text/plain"},
                              timeout=10), 415, ["Content-Type"])  # what another site's form can send
        refused(requests.post(f"{base}/api/label", json=label, headers={"Origin": "http://evil.example"}, timeout=10),
                403, ["Origin"])
        import http.client

        raw = http.client.HTTPConnection(base.split("//")[1], timeout=10)  # a path no client library normalises
        for path in ("/media/pair00000/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/media/pair00000/..%2F..%2Ftask.json"):
            raw.request("GET", path)
            answer = raw.getresponse()
            assert answer.status == 404 and "media" in json.loads(answer.read())["error"], path
        refused(requests.get(f"{base}/media/pair00000/label.json", timeout=10), 404, ["label.json"])
        refused(requests.post(f"{base}/api/label", data=b"x" * 100_000, headers=as_json, timeout=10), 413, [])
        assert len(LabelLog(tmp_path / "ann").records) == 1  # nothing refused was written
    finally:
        server.stop()


def test_token_required_off_loopback_and_checked(tmp_path, pairs, serve):
    server = serve(tmp_path / "ann", pairs, "--token", "s3cret-token")
    try:
        base = server.base
        assert server.url.endswith("?token=s3cret-token")
        assert requests.get(f"{base}/api/next", params={"annotator": "bob"}, timeout=10).status_code == 401
        assert requests.get(f"{base}/", params={"token": "wrong"}, timeout=10).status_code == 401
        with requests.Session() as browser:
            assert browser.get(f"{base}/", params={"token": "s3cret-token"}, timeout=10).status_code == 200
            view = browser.get(f"{base}/api/next", params={"annotator": "bob"}, timeout=10).json()
            assert view["pair"] == "pair00000"
    finally:
        server.stop()
    # binding to all interfaces without --token: a token is generated and printed
    server = serve(tmp_path / "ann", None, "--host", "0.0.0.0")
    try:
        token = server.url.split("?token=")[1]
        assert len(token) >= 16
        assert requests.get(f"{server.base}/api/next", params={"annotator": "bob"}, timeout=10).status_code == 401
        view = requests.get(f"{server.base}/api/next", params={"annotator": "bob"}, headers={"X-Annotate-Token": token},
                            timeout=10)
        assert view.status_code == 200 and view.json()["pair"] == "pair00000"
    finally:
        server.stop()
    too_short = subprocess.run([sys.executable, "-m", "prefdata.annotate", "serve", "--dir", str(tmp_path / "ann"),
                                "--token", ""], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert too_short.returncode == 2 and "--token" in too_short.stderr


def test_kill_while_posting_loses_no_acknowledged_label(tmp_path, pairs, serve):
    """Labels are posted as fast as the server takes them while it is kill -9'ed; after a restart every label the
    server acknowledged is in the log and counts in the annotator's progress."""
    directory = tmp_path / "ann"
    server = serve(directory, pairs)
    acked, stop = [], threading.Event()

    def annotate():
        n = 0
        while not stop.is_set():
            pair = f"pair{n % 8:05d}"
            try:
                r = post(server.base, annotator=f"ann{n // 8}", session="s", pair=pair, choice="tie")
            except requests.RequestException:
                return
            if r.status_code == 200:
                acked.append((f"ann{n // 8}", pair, r.json()["saved"]))
            n += 1

    worker = threading.Thread(target=annotate)
    worker.start()
    while len(acked) < 25:
        time.sleep(0.01)
    server.stop(signal.SIGKILL)
    stop.set()
    worker.join(timeout=30)
    restarted = serve(directory)
    try:
        records = LabelLog(directory).records
        logged = {(r["annotator"], r["pair"], r["seq"]) for r in records}
        assert set(acked) <= logged and len(records) >= len(acked) >= 25
        assert [r["seq"] for r in records] == list(range(len(records)))
        first = requests.get(f"{restarted.base}/api/next", params={"annotator": "ann0"}, timeout=10).json()
        assert first["pair"] is None and first["labelled"] == 8  # ann0 labelled all 8 before the kill
    finally:
        restarted.stop()


def test_unfinished_last_line_is_cut_and_a_bad_line_refused(tmp_path, pairs):
    directory = tmp_path / "ann"
    pair_set, log = open_task(directory, pairs)
    log.append("alice", "s", "pair00000", "a", "a")
    log.close()
    with open(directory / "labels.jsonl", "ab") as f:
        f.write(b'{"seq": 1, "annotator": "alice", "pai')  # a crash mid-write: never acknowledged
    size = (directory / "labels.jsonl").stat().st_size
    reader = LabelLog(directory, read_only=True)  # report/export beside a live server: the tail is not cut
    assert [r["pair"] for r in reader.records] == ["pair00000"] and (directory / "labels.jsonl").stat().st_size == size
    with pytest.raises(ValueError, match="read-only"):
        reader.append("alice", "s", "pair00001", "a", "a")
    log = LabelLog(directory)
    assert [r["pair"] for r in log.records] == ["pair00000"]
    log.append("alice", "s", "pair00001", "b", "a")
    log.close()
    assert [json.loads(x)["seq"] for x in (directory / "labels.jsonl").read_text().splitlines()] == [0, 1]
    with open(directory / "labels.jsonl", "a") as f:
        f.write('{"seq": 2}\n')
    with pytest.raises(ValueError, match="labels.jsonl line 3"):
        LabelLog(directory)
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(pairs.replace("{000000..000000}", "000000"), other / "pairs-000000.tar")
    with pytest.raises(ValueError, match="use another --dir"):
        open_task(directory, str(other / "pairs-{000000..000000}.tar"))


def test_report_and_export(tmp_path, pairs):
    pair_set, log = open_task(tmp_path / "ann", pairs)
    stored = {s["key"]: s["label"] for s in ShardReader(pairs, kind="preference", shuffle=False, epochs=1)}
    truth = {k: v["preference"] for k, v in stored.items()}
    flip = {"a": "b", "b": "a"}
    for i, key in enumerate(pair_set.order):
        log.append("alice", "s1", key, truth[key], "a")
        bob = truth[key] if i < 6 else flip[truth[key]]  # bob disagrees on the last two
        log.append("bob", "s2", key, "tie" if i == 0 else bob, "a")
    log.append("alice", "s3", pair_set.order[1], "skip", "a")  # alice changes her mind: skip replaces her label
    result = report(pair_set, log)
    assert result["annotators"]["alice"] == {"labelled": 7, "skipped": 1, "undone": 0, "sessions": 2,
                                             "labels_written": 9}
    between = result["between_annotators"]["alice|bob"]
    assert between["pairs"] == 7 and between["agreement"] == pytest.approx(4 / 7)
    x = [truth[k] for k in pair_set.order if k != pair_set.order[1]]
    y = ["tie"] + [truth[k] for k in pair_set.order[2:6]] + [flip[truth[k]] for k in pair_set.order[6:]]
    assert between["kappa"] == pytest.approx(cohen_kappa(x, y))
    auto = [k for k in pair_set.order if stored[k]["source"] == "auto"]
    assert result["with_auto_labels"]["pairs"] == len(auto)
    assert result["with_auto_labels"]["per_annotator"]["alice"] == 1.0

    exported = export(pair_set, log, tmp_path / "out", min_annotators=2)
    shards = {s["key"]: s for s in ShardReader(exported["pattern"], kind="preference", shuffle=False, epochs=1)}
    # pair 0: alice a/b vs bob tie -> no majority, dropped; pair 1: alice skipped -> one annotator; 6, 7: conflict
    assert exported == {"exported": 4, "conflict_drop": 3, "too_few_annotators": 1, "pattern": exported["pattern"]}
    assert sorted(shards) == pair_set.order[2:6]
    for key, s in shards.items():
        assert s["label"]["preference"] == truth[key] and s["label"]["source"] == "human"
        assert s["label"]["extra"]["annotators"] == {"alice": truth[key], "bob": truth[key]}
        assert s["label"]["extra"]["previous_label"] == {"preference": truth[key], "source": stored[key]["source"]}
    ties = export(pair_set, log, tmp_path / "out2", min_annotators=1, on_conflict="tie")
    assert ties["exported"] == 8 and ties["conflict_tie"] == 3
    split = {s["key"]: s["label"] for s in ShardReader(ties["pattern"], kind="preference", shuffle=False, epochs=1)}
    assert split[pair_set.order[6]]["preference"] == "tie" and split[pair_set.order[6]]["extra"]["agreement"] == 0.0
    assert split[pair_set.order[0]]["extra"]["agreement"] == 0.5  # alice a or b, bob tie: half said tie
    with pytest.raises(FileExistsError):
        export(pair_set, log, tmp_path / "out2")


def test_undo_guidelines_and_every_reference_captioned(tmp_path, pairs, serve):
    """Undo takes labels back, the most recent first, and shows their pairs again; the log keeps every label and the
    later one counts (report, export). The guidelines show above every pair, across restarts; every person's photo
    of a two-person pair is captioned with its identity."""
    guide = tmp_path / "guide.txt"
    guide.write_text("Judge the faces only.\nIgnore the background.\n")
    directory = tmp_path / "ann"
    server = serve(directory, pairs, "--guidelines", str(guide))
    base = server.base

    def undo(who="alice"):
        return requests.post(f"{base}/api/undo", json={"annotator": who, "session": "s"}, timeout=10)

    try:
        view = requests.get(f"{base}/api/next", params={"annotator": "alice"}, timeout=10).json()
        assert view["guidelines"] == "Judge the faces only.\nIgnore the background." and not view["can_undo"]
        assert undo().status_code == 409 and "no label to undo" in undo().json()["error"]
        post(base, annotator="alice", session="s", pair="pair00000", choice="left")
        view = post(base, annotator="alice", session="s", pair="pair00001", choice="tie").json()
        assert view["pair"] == "pair00002" and view["labelled"] == 2
        back = undo().json()
        assert (back["undone"], back["pair"], back["labelled"]) == ("pair00001", "pair00001", 1)
        meta = json.loads(PairSet.open(pairs).members("pair00001")["meta.json"])
        assert meta["num_people"] == 2 and [r["caption"] for r in back["refs"]] == [
            f"Person {i + 1}: {identity}" for i, identity in enumerate(meta["identity_ids"])]
        assert all(requests.get(base + r["src"], timeout=10).content[:4] == b"\x89PNG" for r in back["refs"])
        back = undo().json()
        assert (back["undone"], back["pair"], back["labelled"]) == ("pair00000", "pair00000", 0)
        assert not back["can_undo"]
        post(base, annotator="bob", session="t", pair="pair00000", choice="tie")  # bob on the same pair: his own
        view = post(base, annotator="alice", session="s", pair="pair00000", choice="right").json()
        assert view["pair"] == "pair00001" and view["labelled"] == 1  # the first pair she has no label for
        assert requests.get(f"{base}/report", timeout=10).headers["Content-Type"].startswith("text/html")
    finally:
        server.stop()
    log = LabelLog(directory, read_only=True)
    assert [(r["annotator"], r["pair"], r["choice"]) for r in log.records] == [
        ("alice", "pair00000", left_slot("pair00000", "alice")), ("alice", "pair00001", "tie"),
        ("alice", "pair00001", "undo"), ("alice", "pair00000", "undo"), ("bob", "pair00000", "tie"),
        ("alice", "pair00000", "b" if left_slot("pair00000", "alice") == "a" else "a")]
    pair_set = PairSet.open(pairs)
    assert report(pair_set, log)["annotators"]["alice"] == {"labelled": 1, "skipped": 0, "undone": 2, "sessions": 1,
                                                            "labels_written": 5}
    exported = export(pair_set, log, tmp_path / "out", on_conflict="tie")
    labels = {s["key"]: s["label"] for s in ShardReader(exported["pattern"], kind="preference", shuffle=False,
                                                         epochs=1)}
    assert list(labels) == ["pair00000"]  # pair00001's label was taken back
    assert labels["pair00000"]["extra"]["annotators"] == {"alice": log.records[-1]["choice"], "bob": "tie"}
    again = serve(directory)  # no --guidelines: the task's are kept
    try:
        view = requests.get(f"{again.base}/api/next", params={"annotator": "carol"}, timeout=10).json()
        assert view["guidelines"].startswith("Judge the faces only.")
    finally:
        again.stop()
    guide.write_bytes(b"caf\xe9 au lait")  # Latin-1, not UTF-8
    bad = subprocess.run([sys.executable, "-m", "prefdata.annotate", "serve", "--dir", str(directory), "--port", "0",
                          "--guidelines", str(guide)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and f"--guidelines {guide}: not UTF-8 text" in bad.stderr, bad.stderr
    assert (directory / "guidelines.txt").read_text().startswith("Judge the faces only.")  # kept as it was


def test_group_commit_acknowledges_a_label_only_after_a_sync_that_covers_it(tmp_path, pairs):
    """10 labels posted at once, then 10 more while the (slowed) fsync of the first 10 runs: each comes back only
    after a sync that started once it was written, the log holds them in the order posted, and two syncs ran."""
    import asyncio

    from prefdata.annotate_io import GroupCommit

    _, log = open_task(tmp_path / "ann", pairs)
    covered = []  # per sync: how many labels were written when it started
    real_sync = log.sync

    def slow_sync():
        covered.append(len(log.records))
        time.sleep(0.05)
        real_sync()

    log.sync = slow_sync
    acked = []  # (seq, syncs finished by then)

    async def post_one(commit, i):
        record = await commit.append(f"ann{i}", "s", "pair00000", "tie", "a")
        acked.append((record["seq"], len(covered)))

    async def post_all():
        commit = GroupCommit(log)
        first = asyncio.gather(*(post_one(commit, i) for i in range(10)))
        await asyncio.sleep(0.01)  # the first sync is running (50 ms)
        await asyncio.gather(first, *(post_one(commit, i) for i in range(10, 20)))

    asyncio.run(post_all())
    log.close()
    assert sorted(seq for seq, _ in acked) == list(range(20)) and covered == [10, 20]
    assert all(done >= 1 and covered[done - 1] > seq for seq, done in acked)  # a sync before the answer covered it
    written = LabelLog(tmp_path / "ann", read_only=True).records
    assert [r["annotator"] for r in written] == [f"ann{i}" for i in range(20)]


@pytest.mark.tools
def test_many_annotators_at_once_lose_nothing_through_a_kill(tmp_path):
    """bench/annotate_load.py small: 6 annotators on the same pairs at once, as fast as the server answers, the
    server kill -9'ed with requests in flight, restarted, and run to the end: every acknowledged label (undos too)
    is in the log at its sequence number, and each annotator's label in force is the last they were answered."""
    from bench.annotate_load import measure

    result = measure(annotators=6, num_pairs=4, kill_after_acks=8, undo_rate=0.2, work=tmp_path)
    figures = result["figures"]
    assert result["problems"] == [] and figures["problems"] == 0
    assert figures["killed_mid_run"] == 1 and figures["acknowledged_before_kill"] >= 8
    assert figures["undos"] > 0 and len(LabelLog(tmp_path / "ann", read_only=True).latest()) == 6 * 4  # all done


def test_cohen_kappa_closed_form():
    assert cohen_kappa(["a", "b", "a", "b"], ["a", "b", "a", "b"]) == 1.0
    # observed 0.5, expected (2*2 + 2*2)/16 = 0.5 -> 0
    assert cohen_kappa(["a", "a", "b", "b"], ["a", "b", "a", "b"]) == 0.0
    assert cohen_kappa(["a", "a"], ["a", "a"]) is None and cohen_kappa([], []) is None


# ----------------------------------------------------------------------------- the page in a real browser


def chromium():
    """(browser, driver) paths; missing: a skip, or a failure where IDENTITY_GRPO_REQUIRE_BROWSER=1 (CI: .ci/run
    installs them and sets it)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (browser and driver):
        if os.environ.get("IDENTITY_GRPO_REQUIRE_BROWSER") == "1":
            pytest.fail("CI must install Debian's chromium and chromium-driver (see .ci/run)")
        pytest.skip("needs chromium and chromedriver (Debian: apt-get install chromium chromium-driver)")
    return browser, driver


def open_browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_page_in_a_headless_browser(tmp_path, pairs, serve):
    """Label with clicks and keys, undo (key and button), close the tab midway, reopen (the name and the place are
    remembered), finish; the guidelines and every person's captioned photo are on screen, the report page shows the
    counts; the exported shards hold exactly the labels given (the later one after an undo), mapped from left/right
    to the stored a/b."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver = open_browser()  # first: without a browser the test skips (or fails) before any server starts
    directory = tmp_path / "ann"
    guide = tmp_path / "guide.txt"
    guide.write_text("Judge the faces only.")
    server = serve(directory, pairs, "--guidelines", str(guide))
    given = {}  # pair -> a | b | tie | skip

    def wait_for(condition, what):
        WebDriverWait(driver, 30).until(lambda d: condition(), message=what)

    def on_screen():
        wait_for(lambda: driver.find_element(By.ID, "task").is_displayed() or driver.find_element(By.ID, "done")
                 .is_displayed(), "the page shows a pair or the end")
        return driver.find_element(By.ID, "task").get_attribute("data-pair") if \
            driver.find_element(By.ID, "task").is_displayed() else None

    def label(how, choice):
        pair = on_screen()
        left = driver.find_element(By.ID, "left").get_attribute("src").rsplit("/", 1)[1][0]  # 'a' or 'b'
        if how == "click":
            driver.find_element(By.ID, f"choose-{choice}").click()
        else:
            driver.find_element(By.TAG_NAME, "body").send_keys(how)
        given[pair] = {"left": left, "right": "b" if left == "a" else "a"}.get(choice, choice)
        wait_for(lambda: on_screen() != pair, f"the page moves on from {pair}")

    try:
        driver.get(server.url)
        driver.find_element(By.ID, "annotator").send_keys("alice")
        driver.find_element(By.ID, "start").click()
        assert on_screen() == "pair00000"
        # both videos load and play together
        wait_for(lambda: driver.execute_script(
            "return document.getElementById('left').readyState >= 2 "
            "&& document.getElementById('right').readyState >= 2"),
            "both videos decode")
        driver.find_element(By.ID, "play").click()  # pause (autoplay started them)
        driver.find_element(By.ID, "play").click()  # play
        wait_for(lambda: driver.execute_script("const l = document.getElementById('left'), r = document.getElementById"
                                               "('right'); return !l.paused && !r.paused;"), "both videos play")
        assert "0 / 8" in driver.find_element(By.ID, "progress").text
        assert driver.find_element(By.ID, "guidelines").text == "Judge the faces only."
        label("click", "left")
        meta = json.loads(PairSet.open(pairs).members("pair00001")["meta.json"])
        captions = [f.text for f in driver.find_elements(By.CSS_SELECTOR, "#refs figcaption")]
        assert len(captions) == 2
        assert captions == [f"Person {i + 1}: {who}" for i, who in enumerate(meta["identity_ids"])]
        label("2", "right")
        driver.find_element(By.TAG_NAME, "body").send_keys("u")  # undo: pair00001 again, relabelled
        wait_for(lambda: on_screen() == "pair00001", "undo shows the last labelled pair again")
        label("3", "tie")
        label(Keys.ARROW_LEFT, "left")
        label("t", "tie")
        label("s", "skip")
        # close the tab midway and open the page again in a new one
        driver.switch_to.new_window("tab")
        first = driver.window_handles[0]
        driver.switch_to.window(first)
        driver.close()
        driver.switch_to.window(driver.window_handles[0])
        driver.get(server.base + "/")
        assert on_screen() == "pair00005" and "5 / 8" in driver.find_element(By.ID, "progress").text
        label("click", "right")
        label("3", "tie")
        label("click", "left")
        assert on_screen() is None and "All 8 pairs" in driver.find_element(By.ID, "done-text").text
        driver.find_element(By.ID, "undo-done").click()
        wait_for(lambda: on_screen() == "pair00007", "the button undoes the last label")
        label("click", "right")
        assert on_screen() is None
        driver.get(server.base + "/report")
        wait_for(lambda: "alice" in driver.find_element(By.ID, "annotators").text, "the report lists alice")
        cells = [c.text for c in driver.find_elements(By.CSS_SELECTOR, "#annotators td")]
        assert cells[:3] == ["alice", "7", "1"] and cells[4] == "2"  # labelled, skipped, ..., undone
    finally:
        driver.quit()
        server.stop()
    out = tmp_path / "human"
    result = subprocess.run([sys.executable, "-m", "prefdata.annotate", "export", "--dir", str(directory),
                             "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    exported = {s["key"]: s["label"] for s in ShardReader(str(out / "human-{000000..000000}.tar"), kind="preference",
                                                          shuffle=False, epochs=1)}
    assert {k: v["preference"] for k, v in exported.items()} == {k: v for k, v in given.items() if v != "skip"}
    assert all(v["source"] == "human" and v["extra"]["annotators"] == {"alice": v["preference"]}
               for v in exported.values())
    assert len(given) == 8 and list(given.values()).count("skip") == 1
