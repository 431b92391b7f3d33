"""``ganforge submit``: the same job as the README's ``ray job submit`` command, through Ray's job
submission client; streams the job's logs and returns its exit status."""

from __future__ import annotations

import asyncio
import shlex


def entrypoint(config: str, overrides: list[str], run_dir: str | None) -> str:
    """The job's command line, exactly as ``ray job submit ... -- <this>`` and the RayJob manifest run it."""
    args = ["python", "-m", "launch.ray_job", config]
    for o in overrides:
        args += ["--set", o]
    if run_dir:
        args += ["--run-dir", run_dir]
    return shlex.join(args)


def submit(
    config: str, address: str, overrides: list[str], run_dir: str | None, working_dir: str = ".", follow: bool = True
) -> int:
    """Submit the job; with ``follow``, print its logs as they come and return 0 only if it SUCCEEDED."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    command = entrypoint(config, overrides, run_dir)
    job_id = client.submit_job(entrypoint=command, runtime_env={"working_dir": working_dir})
    print(f"submitted {job_id} to {address}: {command}", flush=True)
    if not follow:
        return 0

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())
    status = client.get_job_status(job_id)
    print(f"job {job_id}: {status}", flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1
