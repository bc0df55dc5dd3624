"""Human preference labels through a web page: serve, report, export.

    python -m prefdata.annotate serve  --pairs PATTERN --dir DIR [--host 127.0.0.1] [--port 8600] [--token T]
                                   [--display browser|original] [--guidelines FILE]
    python -m prefdata.annotate report --dir DIR
    python -m prefdata.annotate export --dir DIR --out OUT [--min-annotators 1] [--on-conflict drop|tie]

`serve` shows each annotator, one pair at a time, the task's guidelines, every person's reference photo (each
captioned: Person 1, 2, ... and its identity id when the pair knows it), the prompt and the two videos side by
side (played in sync, looped), with buttons and keys for left / right / tie / skip (1 or <-, 2 or ->, 3 or t,
s; space plays or pauses) and undo (u: the last label is taken back and its pair shown again; the log keeps
both labels, the later one counts). Which video is on the left is a fixed coin per pair and annotator. An
annotator types their name once; the page remembers it, and whoever reopens the page continues where they
stopped (a restarted server too): progress lives in the label log (prefdata/annotate_store.py), where every
label is fsync'ed before the page is told it is saved. `--guidelines FILE` (UTF-8 text, at most 4000
characters) sets the text shown above every pair; it is kept in the directory for later starts. The page
`/report` (read-only) shows progress and agreement, as `report` prints them: inter-annotator agreement and
agreement with the pairs' auto labels; `export` writes the labelled pairs as preference shards with
`source: human`.
The page gets the videos re-encoded to H.264 4:2:0 (`--display browser`, the default), which every browser
plays; the shards' own 4:4:4 encoding plays in Chromium only (`--display original` serves it as stored).

Access: the server binds to 127.0.0.1 unless told otherwise. Any other address needs a token (`--token`, or
one is generated and printed): the page URL carries it once (`/?token=...`), then a cookie. Malformed requests
get a 4xx with a JSON `error` naming the field. Built on aiohttp (https://docs.aiohttp.org), which Ray
already installs.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import ipaddress
import json
import logging
import re
import secrets
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence
from urllib.parse import urlsplit

from aiohttp import web

from config import ExpectedError
from config.cli import report_expected
from prefdata.annotate_io import GroupCommit, PairMedia
from prefdata.annotate_store import LabelLog, PairSet, StoreError, export, left_slot, open_task, progress, report

log = logging.getLogger("identity_grpo.annotate")
PAGE = Path(__file__).with_name("annotate_page.html")
REPORT_PAGE = Path(__file__).with_name("annotate_report.html")
GUIDELINES_FILE, MAX_GUIDELINES = "guidelines.txt", 4000
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$")
MEMBER_RE = re.compile(r"^(a\.mp4|b\.mp4|ref_\d+\.png)$")
COOKIE = "annotate_token"
DISPLAYS = ("browser", "original")
CHOICE_TO_SLOT = {"left": None, "right": None, "tie": "tie", "skip": "skip"}  # left/right depend on the layout
PAIRS_KEY, LOG_KEY, TOKEN_KEY, MEDIA_KEY, GUIDE_KEY, COMMIT_KEY = (
    web.AppKey(n, object) for n in ("pairs", "log", "token", "media", "guidelines", "commit"))


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@web.middleware
async def _guard(request: web.Request, handler):
    """Token check (when the server has one), labels only from this page (a JSON POST from the same origin: another
    site's form or script cannot post one into the log), and one JSON shape for every refusal."""
    token = request.app[TOKEN_KEY]
    if token is not None:
        given = request.query.get("token") or request.headers.get("X-Annotate-Token") or request.cookies.get(COOKIE, "")
        if not hmac.compare_digest(given.encode(), token.encode()):
            return _error(401, "missing or wrong token: open the URL the server printed (it ends in ?token=...)")
    if request.method == "POST":
        origin = request.headers.get("Origin")  # host compared, not scheme: a TLS proxy in front changes only that
        if origin is not None and urlsplit(origin).netloc != request.host:
            return _error(403, f"Origin: {origin!r} is not this server; labels are posted by its own page")
        if request.content_type != "application/json":
            return _error(415, f"Content-Type: must be application/json, got {request.content_type!r}")
    try:
        response = await handler(request)
    except web.HTTPException as err:
        if err.status >= 400:
            response = _error(err.status, err.text or err.reason)
            response.headers.update({k: v for k, v in err.headers.items()
                                     if k not in ("Content-Type", "Content-Length")})  # e.g. 416's Content-Range
            return response
        raise
    if token is not None and request.query.get("token"):
        response.set_cookie(COOKIE, token, httponly=True, samesite="Strict")
    return response


def _annotator(value: object, field: str = "annotator") -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise web.HTTPBadRequest(text=f"{field}: must be 1-40 letters, digits, '_', '.' or '-' (starting with a "
                                      f"letter or digit), got {value!r}")
    return value


async def _pair_view(request: web.Request, annotator: str) -> dict:
    pairs: PairSet = request.app[PAIRS_KEY]
    nxt, done = progress(pairs, request.app[LOG_KEY], annotator)
    view = {"annotator": annotator, "labelled": done, "total": len(pairs.order), "pair": nxt,
            "guidelines": request.app[GUIDE_KEY], "can_undo": bool(request.app[LOG_KEY].in_force(annotator))}
    if nxt is not None:
        media_cache: PairMedia = request.app[MEDIA_KEY]
        members = await media_cache.get(nxt)
        following = pairs.position[nxt] + 1
        if following < len(pairs.order):
            media_cache.get(pairs.order[following])  # most annotators go there next: ready when they do
        left = left_slot(nxt, annotator)
        right = "b" if left == "a" else "a"
        view.update(prompt=members["prompt.txt"].decode("utf-8"), refs=_references(nxt, members),
                    left=f"/media/{nxt}/{left}.mp4", right=f"/media/{nxt}/{right}.mp4")
    return view


def _references(pair: str, members: Dict[str, bytes]) -> list:
    """Every person's reference photo in reference order, each with its caption: "Person i", and the identity id
    the pair's meta holds for it unless the writer did not know it (`unknown-<i>`, data/SCHEMA.md)."""
    refs = sorted((m for m in members if m.startswith("ref_")), key=lambda m: int(m[4:].split(".")[0]))
    try:
        ids = json.loads(members.get("meta.json", b"{}")).get("identity_ids") or []
    except ValueError:
        ids = []
    out = []
    for i, member in enumerate(refs):
        known = ids[i] if i < len(ids) and isinstance(ids[i], str) and not ids[i].startswith("unknown-") else None
        out.append({"src": f"/media/{pair}/{member}", "caption": f"Person {i + 1}" + (f": {known}" if known else "")})
    return out


async def page(request: web.Request) -> web.Response:
    return web.Response(text=PAGE.read_text(), content_type="text/html", headers={"Cache-Control": "no-store"})


async def report_page(request: web.Request) -> web.Response:
    return web.Response(text=REPORT_PAGE.read_text(), content_type="text/html", headers={"Cache-Control": "no-store"})


async def next_pair(request: web.Request) -> web.Response:
    return web.json_response(await _pair_view(request, _annotator(request.query.get("annotator"))))


async def _body(request: web.Request, fields: tuple) -> dict:
    """The posted JSON object with exactly `fields` allowed, its annotator and session checked."""
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise web.HTTPBadRequest(text=f"body: not JSON ({err})") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text=f"body: must be a JSON object {{{', '.join(fields)}}}")
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise web.HTTPBadRequest(text=f"{unknown[0]}: unknown field (allowed: {', '.join(fields)})")
    _annotator(body.get("annotator"))
    session = body.get("session")
    if not isinstance(session, str) or not 1 <= len(session) <= 64:
        raise web.HTTPBadRequest(text=f"session: must be a string of 1-64 characters, got {session!r}")
    return body


async def post_label(request: web.Request) -> web.Response:
    body = await _body(request, ("annotator", "session", "pair", "choice"))
    annotator, pair, choice = body["annotator"], body.get("pair"), body.get("choice")
    pairs: PairSet = request.app[PAIRS_KEY]
    if not isinstance(pair, str) or pair not in pairs.refs:
        raise web.HTTPNotFound(text=f"pair: no pair {pair!r} in {pairs.pattern}")
    if not isinstance(choice, str) or choice not in CHOICE_TO_SLOT:
        raise web.HTTPBadRequest(text=f"choice: must be one of {list(CHOICE_TO_SLOT)}, got {choice!r}")
    left = left_slot(pair, annotator)
    slot = CHOICE_TO_SLOT[choice] or (left if choice == "left" else ("b" if left == "a" else "a"))
    record = await request.app[COMMIT_KEY].append(annotator, body["session"], pair, slot, left)  # durable first
    return web.json_response({"saved": record["seq"], "label": slot, **(await _pair_view(request, annotator))})


async def post_undo(request: web.Request) -> web.Response:
    """Take back this annotator's most recent label in force: an `undo` record (durable before the answer); the
    view that comes back shows that pair again."""
    body = await _body(request, ("annotator", "session"))
    annotator, label_log = body["annotator"], request.app[LOG_KEY]
    with_labels = label_log.in_force(annotator)
    if not with_labels:
        raise web.HTTPConflict(text=f"annotator: {annotator!r} has no label to undo")
    pair = with_labels[-1]
    record = await request.app[COMMIT_KEY].append(annotator, body["session"], pair, "undo", left_slot(pair, annotator))
    return web.json_response({"saved": record["seq"], "undone": pair, **(await _pair_view(request, annotator))})


async def media(request: web.Request) -> web.StreamResponse:
    pair, member = request.match_info["pair"], request.match_info["member"]
    if pair not in request.app[PAIRS_KEY].refs or not MEMBER_RE.match(member):
        raise web.HTTPNotFound(text=f"media: no {member!r} of pair {pair!r}")
    members = await request.app[MEDIA_KEY].get(pair)
    if member not in members:
        raise web.HTTPNotFound(text=f"media: pair {pair!r} has no member {member!r}")
    kind = "video/mp4" if member.endswith(".mp4") else "image/png"
    return _ranged(request, members[member], kind)


def _ranged(request: web.Request, body: bytes, content_type: str) -> web.Response:
    """The bytes, or the part a `Range: bytes=...` header asks for (206): Safari plays no video served without
    byte ranges, and browsers seek with them."""
    headers = {"Cache-Control": "private, max-age=3600", "Accept-Ranges": "bytes"}
    try:
        wanted = request.http_range  # slice(start, stop), negative start for a suffix; ValueError when malformed
    except ValueError:
        raise web.HTTPRequestRangeNotSatisfiable(text=f"Range: cannot parse {request.headers.get('Range')!r}") from None
    if wanted.start is None and wanted.stop is None:
        return web.Response(body=body, content_type=content_type, headers=headers)
    start, stop, _ = wanted.indices(len(body))
    if start >= stop:
        raise web.HTTPRequestRangeNotSatisfiable(
            text=f"Range: {request.headers.get('Range')!r} is outside the {len(body)} bytes",
            headers={"Content-Range": f"bytes */{len(body)}"})
    headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(body)}"
    return web.Response(status=206, body=body[start:stop], content_type=content_type, headers=headers)


async def get_report(request: web.Request) -> web.Response:
    return web.json_response(report(request.app[PAIRS_KEY], request.app[LOG_KEY]))


def display_members(pairs: PairSet, pair: str, display: str) -> Dict[str, bytes]:
    """A pair's members as the page shows them: with `display="browser"` the videos re-encoded to H.264 4:2:0
    (data/video.py browser_mp4: our 4:4:4 mp4 plays in Chromium, not in Safari or most Firefox builds); with
    "original" the stored bytes. Export always reads the stored bytes (prefdata/annotate_store.py)."""
    from data.video import MediaError, browser_mp4

    members = pairs.members(pair)
    if display == "original":
        return members
    shown = dict(members)
    for name in ("a.mp4", "b.mp4"):
        try:
            shown[name] = browser_mp4(members[name])
        except (KeyError, MediaError) as err:
            log.warning("pair %s: %s served as stored (no browser transcode: %s)", pair, name, err)
    return shown


def make_app(pairs: PairSet, label_log: LabelLog, token: Optional[str] = None, cache_pairs: int = 16,
             display: str = "browser", guidelines: str = "") -> web.Application:
    """The aiohttp application (tests drive it through a real server, see tests/test_prefdata_annotate.py)."""
    from functools import partial

    if display not in DISPLAYS:
        raise ValueError(f"--display: one of {DISPLAYS}, got {display!r}")
    app = web.Application(middlewares=[_guard], client_max_size=64 * 1024)
    app[PAIRS_KEY], app[LOG_KEY], app[TOKEN_KEY], app[GUIDE_KEY] = pairs, label_log, token, guidelines
    app[COMMIT_KEY] = GroupCommit(label_log)
    # a pair's members: read (and transcoded) once, off the event loop, served many times
    app[MEDIA_KEY] = PairMedia(partial(display_members, pairs, display=display), cache_pairs)
    app.router.add_get("/", page)
    app.router.add_get("/api/next", next_pair)
    app.router.add_post("/api/label", post_label)
    app.router.add_post("/api/undo", post_undo)
    app.router.add_get("/api/report", get_report)
    app.router.add_get("/report", report_page)
    app.router.add_get("/media/{pair}/{member}", media)
    return app


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def task_guidelines(directory: str | Path, given: Optional[str]) -> str:
    """The task's guideline text: `given` (a file, checked and kept in the directory for later starts) or the one
    kept there before, or none."""
    kept = Path(directory) / GUIDELINES_FILE
    if given is None:
        return kept.read_text(encoding="utf-8") if kept.exists() else ""
    try:
        text = Path(given).read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        raise StoreError(f"--guidelines {given}: not UTF-8 text") from None
    if not text or len(text) > MAX_GUIDELINES:
        raise StoreError(f"--guidelines {given}: {len(text)} characters; 1 to {MAX_GUIDELINES} are shown above "
                         "each pair")
    kept.write_text(text, encoding="utf-8")
    return text


def serve(args) -> int:
    pairs, label_log = open_task(args.dir, args.pairs)
    guidelines = task_guidelines(args.dir, args.guidelines)
    token = args.token
    if token is not None and len(token) < 8:
        raise ValueError(f"--token: at least 8 characters, got {len(token)}")
    if token is None and not _is_loopback(args.host):
        token = secrets.token_urlsafe(16)
    app = make_app(pairs, label_log, token, display=args.display, guidelines=guidelines)
    runner = web.AppRunner(app, access_log=None)

    async def start():
        await runner.setup()
        await web.TCPSite(runner, args.host, args.port).start()
        port = runner.addresses[0][1]  # the real port when --port 0
        url = f"http://{args.host}:{port}/" + (f"?token={token}" if token else "")
        print(f"annotate: {len(pairs.order)} pairs from {pairs.pattern}, labels in {label_log.path}", flush=True)
        print(f"annotate: serving on {url}", flush=True)
        report_url = url.replace("/?", "/report?") if token else url + "report"
        print(f"annotate: progress and agreement (read-only) on {report_url}", flush=True)

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(start())
        loop.run_forever()
    except KeyboardInterrupt:
        pass
    finally:
        loop.run_until_complete(runner.cleanup())
        label_log.close()
        loop.close()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prefdata.annotate", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve the annotation page")
    s.add_argument("--pairs", help="preference shards to label (brace pattern); needed the first time only")
    s.add_argument("--dir", required=True, help="annotation directory: task.json and the label log")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8600, help="0: any free port (printed)")
    s.add_argument("--token", help="required from every client (default: none on 127.0.0.1, else generated)")
    s.add_argument("--display", choices=DISPLAYS, default="browser",
                   help="videos as the page gets them: re-encoded to H.264 4:2:0, which every browser plays "
                        "(default), or the stored bytes (4:4:4: Chromium only)")
    s.add_argument("--guidelines", help="a UTF-8 text file shown above every pair (kept for later starts)")
    r = sub.add_parser("report", help="print the agreement report (JSON)")
    r.add_argument("--dir", required=True)
    e = sub.add_parser("export", help="write the labelled pairs as preference shards with source=human")
    e.add_argument("--dir", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--prefix", default="human")
    e.add_argument("--min-annotators", type=int, default=1)
    e.add_argument("--on-conflict", choices=["drop", "tie"], default="drop",
                   help="a pair whose annotators have no majority label: left out, or labelled tie")
    e.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    try:
        if args.command == "serve":
            return serve(args)
        pairs, label_log = open_task(args.dir, None, read_only=True)  # may run beside a live server
        try:
            if args.command == "report":
                print(json.dumps(report(pairs, label_log), indent=2, sort_keys=True))
            else:
                if args.min_annotators < 1:
                    raise ValueError(f"--min-annotators must be >= 1, got {args.min_annotators}")
                result = export(pairs, label_log, args.out, args.prefix, args.min_annotators, args.on_conflict,
                                overwrite=args.overwrite)
                print(f"annotate: exported {result.get('exported', 0)} human-labelled pairs: {result['pattern']} "
                      f"({json.dumps({k: v for k, v in result.items() if k not in ('exported', 'pattern')})})")
        finally:
            label_log.close()
    except (ExpectedError, FileNotFoundError, FileExistsError, ValueError, OSError) as err:
        return report_expected("annotate", str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
