"""Submit a job to a running Ray cluster, waiting (bounded) until its job agent accepts jobs.

    python -m launcher.submit --address http://head:8265 [--runtime-env cluster_configs/runtime_env.yaml]
        [--agent-timeout-s 180] [--no-wait] -- python -m launcher.train --config ... key=value

It does what `ray job submit --working-dir . --runtime-env FILE -- CMD` does (the job's working directory
is this one, uploaded minus the runtime env's `excludes`), plus the wait: a head that has just started
does not listen yet, and then answers `500: No available agent to submit job, please try again later`
until its job agent registers (Ray's dashboard/modules/job/job_head.py answers so when finding an agent
times out), seconds on a quiet machine, a minute under load. Those two are retried until
--agent-timeout-s; any other refusal fails at once. Without --no-wait it follows the job's log to the end
and exits 0 only when the job SUCCEEDED.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import yaml

from config import ExpectedError
from config.cli import at_least, expected_errors

NOT_READY = ("No available agent", "Failed to connect", "Connection refused", "ConnectionError",
             "Max retries exceeded")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(ExpectedError):
    """An expected failure: the message names the address, the file or the job."""


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        raise SubmitError("no job command: put it after '--', e.g. -- python -m launcher.train --config FILE")
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m launcher.submit", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", required=True, help="the head's dashboard, e.g. http://head:8265")
    parser.add_argument("--runtime-env", default="cluster_configs/runtime_env.yaml", type=Path)
    parser.add_argument("--working-dir", default=".", help="uploaded as the job's working directory")
    parser.add_argument("--agent-timeout-s", type=at_least(1.0, float), default=180.0,
                        help="how long a fresh head may take to accept jobs")
    parser.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    args = parser.parse_args(argv[:split])
    args.command = argv[split + 1:]
    if not args.command:
        raise SubmitError("no job command after '--'")
    return args


def runtime_env(path: Path, working_dir: str) -> dict:
    """The runtime env file (a mapping: excludes, env_vars, ...) with the working directory to upload."""
    if not path.is_file():
        raise SubmitError(f"--runtime-env {path}: no such file")
    try:
        env = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise SubmitError(f"--runtime-env {path}: not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(env, dict):
        raise SubmitError(f"--runtime-env {path}: must be a mapping (excludes, env_vars, ...), "
                          f"got {type(env).__name__}")
    return {**env, "working_dir": working_dir}


def retry_until_ready(call: Callable, what: str, address: str, timeout_s: float, poll_s: float = 2.0):
    """`call()`, again while the head is not ready (not listening, or no job agent yet), for at most timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return call()
        except Exception as err:  # noqa: BLE001 - Ray's SDK raises RuntimeError/ConnectionError by message
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if not any(marker in f"{type(err).__name__}: {err}" for marker in NOT_READY):
                raise SubmitError(f"{what} at {address} failed: {message}") from None
            if time.monotonic() + poll_s > deadline:
                raise SubmitError(f"the Ray head at {address} did not accept jobs within --agent-timeout-s "
                                  f"{timeout_s:g} ({message}); is it running, and is this its dashboard "
                                  "address (port 8265 by default)?") from None
            time.sleep(poll_s)


def follow(client, job_id: str, poll_s: float = 2.0) -> str:
    """Print the job's log as it grows until the job ends; returns its final status."""
    printed = 0
    while True:
        status = str(client.get_job_status(job_id)).rsplit(".", 1)[-1]
        logs = client.get_job_logs(job_id)
        sys.stdout.write(logs[printed:])
        sys.stdout.flush()
        printed = len(logs)
        if status in TERMINAL:
            return status
        time.sleep(poll_s)


def submit(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    env = runtime_env(args.runtime_env, args.working_dir)
    from ray.job_submission import JobSubmissionClient

    client = retry_until_ready(lambda: JobSubmissionClient(args.address), "connecting", args.address,
                               args.agent_timeout_s)
    entrypoint = shlex.join(args.command)
    job_id = retry_until_ready(lambda: client.submit_job(entrypoint=entrypoint, runtime_env=env),
                               "submitting the job", args.address, args.agent_timeout_s)
    print(f"submit: job {job_id} submitted to {args.address}: {entrypoint}", flush=True)
    if args.no_wait:
        return 0
    status = follow(client, job_id)
    print(f"submit: job {job_id} {status}", flush=True)
    return 0 if status == "SUCCEEDED" else 1


def main(argv: Optional[List[str]] = None) -> int:
    """The job's outcome (0 when it SUCCEEDED); an expected failure exits 2 with one line naming the culprit."""
    with expected_errors("submit"):
        return submit(argv)


if __name__ == "__main__":
    raise SystemExit(main())
