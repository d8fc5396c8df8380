"""The remote-runner preflight (pipelines.beam_options.remote_problem): one line, exit 2, nothing staged."""

from __future__ import annotations

import os

import pytest

from pipelines import batch_predict, beam_options, download, preprocess

GOOD_REMOTE = [
    "--runner",
    "DataflowRunner",
    "--project",
    "p",
    "--region",
    "r",
    "--temp_location",
    "gs://b/tmp",
    "--sdk_container_image",
    "r-docker.pkg.dev/p/hpa/worker:1",
]


def _flags(**replace):
    flags = list(GOOD_REMOTE)
    for name, value in replace.items():
        i = flags.index(f"--{name}")
        if value is None:
            del flags[i : i + 2]
        else:
            flags[i + 1] = value
    return flags


@pytest.mark.parametrize(
    "paths, flags, problem",
    [
        (["gs://b/x.csv"], ["gs://b/out"], None),
        (["/data/x.csv"], ["gs://b/out"], "local: /data/x.csv"),
        (["gs://b/x.csv"], ["out/"], "local: out/"),
        (["file:///data/x.csv"], ["gs://b/out"], "local: file:///data/x.csv"),
        (["gs://b/x.csv", None], ["gs://b/out"], None),  # an optional path not given
    ],
)
def test_every_path_must_be_on_storage_the_workers_reach(paths, flags, problem):
    got = beam_options.remote_problem(GOOD_REMOTE, paths, flags)
    assert got == problem if problem is None else problem in got


def test_temp_location_and_worker_software_are_required():
    paths = (["gs://b/x.csv"], ["gs://b/out"])
    assert "--temp_location" in beam_options.remote_problem(_flags(temp_location=None), *paths)
    assert "--temp_location" in beam_options.remote_problem(_flags(temp_location="/tmp"), *paths)
    assert "--sdk_container_image" in beam_options.remote_problem(_flags(sdk_container_image=None), *paths)
    with_setup = [*_flags(sdk_container_image=None), "--setup_file", "./setup.py"]
    assert beam_options.remote_problem(with_setup, *paths) is None
    with_requirements = [*_flags(sdk_container_image=None), "--requirements_file", "r.txt"]
    assert beam_options.remote_problem(with_requirements, *paths) is None


@pytest.mark.parametrize(
    "flags, shared",
    [
        ([], True),
        (["--runner", "DirectRunner"], True),
        (
            ["--runner", "PortableRunner", "--job_endpoint", "localhost:1", "--environment_type", "LOOPBACK"],
            True,
        ),
        (
            ["--runner", "PortableRunner", "--job_endpoint", "localhost:1", "--environment_type", "EXTERNAL"]
            + ["--environment_config", "127.0.0.1:2"],
            True,
        ),
        (["--runner", "PortableRunner", "--job_endpoint", "localhost:1"], False),  # Docker workers
        (
            ["--runner", "PortableRunner", "--job_endpoint", "flink:8099", "--environment_type", "PROCESS"],
            False,
        ),
        (["--runner", "DataflowRunner"], False),
    ],
)
def test_which_runners_share_this_machines_files(flags, shared):
    assert beam_options.workers_share_this_machine(flags) is shared
    if shared:
        assert beam_options.remote_problem(flags, ["/local/in"], ["/local/out"]) is None


@pytest.mark.parametrize(
    "main, argv",
    [
        (preprocess.main, ["--labels_csv", "gs://b/train.csv", "--input_dir", "gs://b/train"]),
        (download.main, ["--labels_csv", "gs://b/HPAv18.csv"]),
        (
            batch_predict.main,
            ["--input_dir", "gs://b/test", "--model_dir", "gs://b/run", "--out", "{out}/submission.csv"],
        ),
    ],
    ids=["preprocess", "download", "batch_predict"],
)
def test_each_job_stops_with_one_line_before_anything_is_staged(main, argv, tmp_path, capsys):
    out = str(tmp_path / "out")
    argv = [a.replace("{out}", out) for a in argv]
    if main is not batch_predict.main:
        argv += ["--output_dir", out]
    with pytest.raises(SystemExit) as e:
        main([*argv, *GOOD_REMOTE])
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if ": error: " in line]
    assert e.value.code == 2 and len(errors) == 1, err  # one line (beside the usage or the --help hint)
    assert ": error: with --runner DataflowRunner" in errors[0] and out in errors[0], err
    assert not os.path.exists(out)  # nothing created, staged or written
