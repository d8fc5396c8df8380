"""Beam options shared by the project's Beam jobs (preprocessing, download, batch prediction).

A Beam job parses its own flags with `parse_known_args` and hands the rest to Beam's PipelineOptions, which
would drop a misspelt flag with a log line; `reject_unknown_beam_flags` makes that bad usage (exit 2).
`beam_pipeline_options` builds the options with the project's defaults for local and remote runners.
"""

from __future__ import annotations

import argparse
import os
import subprocess
from typing import Sequence

from schemas import cli


def reject_unknown_beam_flags(parser: argparse.ArgumentParser, beam_args: Sequence[str]) -> None:
    """Exits through `parser.error` (status 2) when a flag left for Beam is no Beam pipeline option either.

    The error line names the closest flag of the job or of Beam (`did you mean --temp_location?`).

    Args:
      parser: the job's own parser (for its usage line and prog).
      beam_args: what `parser.parse_known_args` left over (`--flag-name` already spelt `--flag_name`).
    """
    from apache_beam.options.pipeline_options import PipelineOptions

    given = PipelineOptions(list(beam_args)).get_all_options(retain_unknown_options=True)
    beam_flags = set(PipelineOptions([]).get_all_options())
    unknown = sorted(set(given) - beam_flags)
    if unknown:
        known = [f"--{name}" for name in beam_flags] + [
            s for action in parser._actions for s in action.option_strings if s.startswith("--")
        ]
        message = cli.unrecognized([f"--{name}" for name in unknown], known)
        parser.error(f"{message}: neither flags of this job nor Beam pipeline options")


LOCAL_RUNNERS = (None, "DirectRunner", "direct", "FnApiRunner", "PrismRunner")


def beam_pipeline_options(beam_args: Sequence[str], local_workers: int | None = None):
    """Beam's PipelineOptions of a job, and whether it runs locally: (options, local).

    Remote runners get this project's setup.py (their workers need its packages) unless --setup_file is
    given. Local runs with several DirectRunner workers run them as processes (Beam's default, threads, would
    share one GIL) unless --direct_running_mode is given.

    Args:
      beam_args: what the job's parser left over.
      local_workers: DirectRunner workers when --direct_num_workers is not given (None: Beam's default, 1).
    """
    from apache_beam.options.pipeline_options import (
        DirectOptions,
        PipelineOptions,
        SetupOptions,
        StandardOptions,
    )

    given = " ".join(beam_args)
    options = PipelineOptions(list(beam_args))
    local = options.view_as(StandardOptions).runner in LOCAL_RUNNERS
    if local:
        direct = options.view_as(DirectOptions)
        if local_workers is not None and "--direct_num_workers" not in given:
            direct.direct_num_workers = local_workers
        if direct.direct_num_workers > 1 and "--direct_running_mode" not in given:
            direct.direct_running_mode = "multi_processing"
        if direct.direct_running_mode == "multi_processing":
            sdk_workers_in_their_own_session()
    else:
        setup = options.view_as(SetupOptions)
        if not setup.setup_file:
            setup.setup_file = os.path.join(
                os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py"
            )
    return options, local


class _SessionSubprocess:
    """`subprocess` as Beam's local job service sees it: its worker processes start in their own session."""

    def __getattr__(self, name):
        return getattr(subprocess, name)

    @staticmethod
    def Popen(*args, **kwargs):  # noqa: N802 - subprocess' own name
        kwargs.setdefault("start_new_session", True)
        return subprocess.Popen(*args, **kwargs)


def sdk_workers_in_their_own_session() -> None:
    """Starts the SDK worker processes of a local multi-process run outside the terminal's process group.

    A terminal's Ctrl-C signals every process of its foreground group: Beam's workers (`sh -c python -m
    apache_beam.runners.worker.sdk_worker_main`, started by `local_job_service.SubprocessSdkWorker`) died
    of it on their own, and Beam's thread that waits for each one printed `RuntimeError: Worker subprocess
    exited` tracebacks beside the command's one interrupt line. In their own session only the command gets
    the signal; its handler stops them (`cli.stop_children`). A SIGKILLed command's workers end by
    themselves when its gRPC channel closes (within seconds, measured).
    """
    from apache_beam.runners.portability import local_job_service

    if not isinstance(local_job_service.subprocess, _SessionSubprocess):
        local_job_service.subprocess = _SessionSubprocess()


_LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]", "::1")
# Environments whose SDK workers run as processes of this machine's user (so they see its files).
_HOST_ENVIRONMENTS = ("LOOPBACK", "PROCESS", "EXTERNAL")


def _host(address: str | None) -> str:
    address = (address or "").split("://")[-1]
    return address.rsplit(":", 1)[0] if ":" in address else address


def workers_share_this_machine(beam_args: Sequence[str]) -> bool:
    """True when the job's workers read and write this machine's files.

    That is a local runner, or a portable runner (PortableRunner, FlinkRunner, SparkRunner) whose job
    service is on loopback and whose SDK workers run here as processes (LOOPBACK, PROCESS, or an EXTERNAL
    worker pool on loopback). Docker workers and every other runner (DataflowRunner...) do not.
    """
    from apache_beam.options.pipeline_options import PipelineOptions, PortableOptions, StandardOptions

    options = PipelineOptions(list(beam_args))
    runner = options.view_as(StandardOptions).runner
    if runner in LOCAL_RUNNERS:
        return True
    portable = options.view_as(PortableOptions)
    if _host(portable.job_endpoint) not in _LOOPBACK_HOSTS:
        return False
    env = (portable.environment_type or "DOCKER").upper()
    if env not in _HOST_ENVIRONMENTS:
        return False
    return env != "EXTERNAL" or _host(portable.environment_config) in _LOOPBACK_HOSTS


def _on_shared_storage(path: str) -> bool:
    scheme, sep, _ = path.partition("://")
    return bool(sep) and scheme.lower() != "file"


def remote_problem(beam_args: Sequence[str], inputs: Sequence[str], outputs: Sequence[str]) -> str | None:
    """What keeps a job on remote workers from working, in one line, or None (also for local runs).

    With workers on other machines, every input and output path must be on a file system they reach (an
    object store such as gs://; a local path would be read or written on each worker's own disk),
    --temp_location must be set there too, and the workers need their software: a container
    (--sdk_container_image, see docs/dataflow.md) or packages to install at start (--requirements_file, or
    an explicit --setup_file; this project's setup.py is staged in any case).
    """
    from apache_beam.options.pipeline_options import (
        GoogleCloudOptions,
        PipelineOptions,
        SetupOptions,
        StandardOptions,
        WorkerOptions,
    )

    if workers_share_this_machine(beam_args):
        return None
    options = PipelineOptions(list(beam_args))
    runner = options.view_as(StandardOptions).runner
    local = [p for p in [*inputs, *outputs] if p and not _on_shared_storage(p)]
    if local:
        return (
            f"with --runner {runner} the workers run on other machines, so every input and output must be on "
            f"storage they reach (gs://...); local: {', '.join(local)}"
        )
    temp = options.view_as(GoogleCloudOptions).temp_location
    if not temp or not _on_shared_storage(temp):
        return f"with --runner {runner}, give --temp_location on storage the workers reach (gs://B/tmp)"
    given = " ".join(beam_args)
    setup = options.view_as(SetupOptions)
    has_software = (
        options.view_as(WorkerOptions).sdk_container_image
        or setup.requirements_file
        or "--setup_file" in given
    )
    if not has_software:
        return (
            f"with --runner {runner}, give the workers their software: --sdk_container_image (the project's "
            "worker container, docs/dataflow.md) or --setup_file ./setup.py / --requirements_file "
            "(installed on every worker at start: slow, and it needs the internet)"
        )
    return None


def check_remote(
    parser: argparse.ArgumentParser, beam_args: Sequence[str], inputs: Sequence[str], outputs: Sequence[str]
) -> None:
    """Exits through `parser.error` (status 2, one line, before anything is staged) on a `remote_problem`."""
    problem = remote_problem(beam_args, inputs, outputs)
    if problem:
        parser.error(problem)
