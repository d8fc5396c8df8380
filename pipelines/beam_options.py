"""Beam options shared by the project's Beam jobs (preprocessing, download, batch prediction).

A Beam job parses its own flags with `parse_known_args` and hands the rest to Beam's PipelineOptions, which
would drop a misspelt flag with a log line; `reject_unknown_beam_flags` makes that bad usage (exit 2).
`beam_pipeline_options` builds the options with the project's defaults for local and remote runners.
"""

from __future__ import annotations

import argparse
import os
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
    else:
        setup = options.view_as(SetupOptions)
        if not setup.setup_file:
            setup.setup_file = os.path.join(
                os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py"
            )
    return options, local
