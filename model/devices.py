"""Devices of a training run: strategy, replicas, precision, XLA, and the checks that fail loudly.

The flags are checked in two steps, both before any data is read:
  1. `check_flags` (no TensorFlow): an unknown --strategy or --jit_compile, --cpu_replicas < 1, a malformed
     TF_CONFIG, `multiworker` without TF_CONFIG.
  2. `setup` (TensorFlow imported, devices not yet initialised): a large backbone without a GPU (unless
     --allow_cpu), --cpu_replicas with GPUs present; then the CPU is split into logical devices and the
     tf.distribute strategy created (MultiWorkerMirroredStrategy must exist before any other TF op).

Strategies: `default` (one device), `mirrored` (every local GPU, or the --cpu_replicas logical CPUs),
`multiworker` (MultiWorkerMirroredStrategy over the machines of TF_CONFIG); `auto` picks multiworker when
TF_CONFIG names several machines, mirrored with several GPUs or --cpu_replicas > 1, else default.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

from model.config import ConfigError

STRATEGIES: tuple[str, ...] = ("auto", "default", "mirrored", "multiworker")
JIT_CHOICES: tuple[str, ...] = ("auto", "on", "off")
CPU_BACKBONES: tuple[str, ...] = ("small",)  # backbones that train in reasonable time on a CPU
GPU_INSTALL = "make setup-gpu (pip install -c constraints-gpu.txt -e '.[gpu]')"
TF_CONFIG = "TF_CONFIG"
_JOBS = ("chief", "worker")  # the tasks that train under MultiWorkerMirroredStrategy
_CLASS_NAMES = {
    "default": "default",
    "mirrored": "MirroredStrategy",
    "multiworker": "MultiWorkerMirroredStrategy",
}


@dataclasses.dataclass(frozen=True)
class Cluster:
    """This process's place in a multi-machine run described by TF_CONFIG.

    Attributes:
      workers: machines that train (chief + workers).
      task_type: `chief` or `worker`.
      task_index: index of this task within its type.
      has_chief: the cluster names a chief (else worker 0 leads).
    """

    workers: int
    task_type: str
    task_index: int
    has_chief: bool = False

    @property
    def is_chief(self) -> bool:
        """The task that writes the outputs: the chief, or worker 0 when the cluster has no chief."""
        return self.task_type == "chief" or (not self.has_chief and self.task_index == 0)

    @property
    def task_name(self) -> str:
        """`worker_1`, `chief_0`: a stable name for this task's own files."""
        return f"{self.task_type}_{self.task_index}"


def parse_tf_config(raw: str | None) -> Cluster | None:
    """The cluster named by a TF_CONFIG value (None when unset or empty).

    Raises:
      ConfigError: not JSON, no cluster / task, a task outside the cluster, addresses not `host:port`,
        parameter servers or evaluators (not supported by this job).
    """
    if not raw or not raw.strip():
        return None
    try:
        conf = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{TF_CONFIG} is not valid JSON ({e})") from None
    if not isinstance(conf, dict) or not isinstance(conf.get("cluster"), dict):
        raise ConfigError(
            f'{TF_CONFIG} needs a "cluster" object, e.g. {{"cluster": {{"worker": ["h1:2222"]}}}}'
        )
    cluster, task = conf["cluster"], conf.get("task")
    unsupported = sorted(set(cluster) - set(_JOBS))
    if unsupported:
        raise ConfigError(f"{TF_CONFIG} names {unsupported}: only chief and worker tasks are supported")
    for job, addresses in cluster.items():
        if not isinstance(addresses, list) or not all(_is_address(a) for a in addresses):
            raise ConfigError(f'{TF_CONFIG} cluster "{job}" must be a list of "host:port" strings')
    if len(cluster.get("chief", [])) > 1:
        raise ConfigError(f"{TF_CONFIG} names {len(cluster['chief'])} chiefs; at most one")
    workers = sum(len(cluster.get(job, [])) for job in _JOBS)
    if workers == 0:
        raise ConfigError(f"{TF_CONFIG} names no chief or worker")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise ConfigError(f'{TF_CONFIG} needs a "task" object with "type" and "index"')
    kind, index = task["type"], task["index"]
    if kind not in cluster or not isinstance(index, int) or not 0 <= index < len(cluster[kind]):
        raise ConfigError(f"{TF_CONFIG} task {kind}:{index} is not in its cluster {sorted(cluster)}")
    return Cluster(workers=workers, task_type=kind, task_index=index, has_chief=bool(cluster.get("chief")))


def _is_address(value: Any) -> bool:
    if not isinstance(value, str) or ":" not in value:
        return False
    host, _, port = value.rpartition(":")
    return bool(host) and port.isdigit()


def check_flags(
    strategy: str, jit_compile: str, cpu_replicas: int | None, tf_config: str | None
) -> Cluster | None:
    """Checks the device flags and TF_CONFIG without touching TensorFlow; returns the cluster (or None).

    Raises:
      ConfigError: the first bad flag, with what to change.
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"--strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    if jit_compile not in JIT_CHOICES:
        raise ConfigError(f"--jit_compile {jit_compile!r} is not one of {', '.join(JIT_CHOICES)}")
    if cpu_replicas is not None and cpu_replicas < 1:
        raise ConfigError(f"--cpu_replicas must be >= 1, got {cpu_replicas}")
    cluster = parse_tf_config(tf_config)
    if strategy == "multiworker" and cluster is None:
        raise ConfigError(
            f"--strategy multiworker needs {TF_CONFIG} (the cluster's workers and this task), "
            'e.g. {"cluster": {"worker": ["h1:2222", "h2:2222"]}, "task": {"type": "worker", "index": 0}}'
        )
    if cluster is not None and cluster.workers > 1 and strategy in ("default", "mirrored"):
        raise ConfigError(
            f"{TF_CONFIG} names {cluster.workers} machines but --strategy {strategy} trains on one: "
            f"use --strategy multiworker (or auto), or unset {TF_CONFIG}"
        )
    if strategy == "default" and (cpu_replicas or 1) > 1:
        raise ConfigError("--cpu_replicas > 1 needs --strategy mirrored (or auto): default uses one device")
    if (cpu_replicas or 1) > 1 and choose_strategy(strategy, cluster, 0, cpu_replicas) == "multiworker":
        raise ConfigError("--cpu_replicas > 1 does not combine with multiworker: one CPU device per worker")
    return cluster


def choose_strategy(requested: str, cluster: Cluster | None, gpus: int, cpu_replicas: int | None) -> str:
    """`auto` -> multiworker (TF_CONFIG names several machines), mirrored (several GPUs or CPU replicas),
    else default; an explicit choice is returned as is."""
    if requested != "auto":
        return requested
    if cluster is not None and cluster.workers > 1:
        return "multiworker"
    if gpus > 1 or (cpu_replicas or 1) > 1:
        return "mirrored"
    return "default"


def check_gpus(backbone: str, gpus: int, allow_cpu: bool, cpu_replicas: int | None) -> None:
    """Stops a run that would silently train a large backbone on the CPU, or split a CPU next to GPUs.

    Raises:
      ConfigError: what is wrong and how to fix it.
    """
    if cpu_replicas is not None and gpus > 0:
        raise ConfigError(
            f"--cpu_replicas splits the CPU (tests, laptops) but {gpus} GPU(s) are visible: drop the flag"
        )
    if gpus == 0 and backbone not in CPU_BACKBONES and not allow_cpu:
        raise ConfigError(
            f"no GPU is visible to TensorFlow and --backbone {backbone} would train on the CPU; "
            f"install the GPU build with {GPU_INSTALL}, or pass --allow_cpu to train on the CPU anyway"
        )


DETERMINISTIC_NO_XLA = (
    "XLA off under --deterministic: XLA's GPU determinism refuses ops these backbones train with (the "
    "max-pool gradient, scatters), while TensorFlow's own kernels have deterministic versions"
)


def resolve_jit(
    requested: str, gpus: int, local_replicas: int, multiworker: bool = False, deterministic: bool = False
) -> bool:
    """XLA for the whole training step (Keras `jit_compile`) as one explicit choice.

    `auto` is on with a GPU and off on a CPU, whatever the strategy (Keras's own `auto` turns XLA off under
    any tf.distribute strategy, so one and several GPUs would differ). Keras 3 compiles the step around
    `strategy.run`, which fails when one process drives several devices (MirroredStrategy over 2+ GPUs): there
    `auto` is off and `on` is an error; one process per GPU (`multiworker`) keeps XLA. XLA has no collective
    ops on CPU devices, so `multiworker` on CPUs cannot use it either.

    Under `deterministic` (op determinism) XLA is off with a GPU: `auto` turns it off (DETERMINISTIC_NO_XLA
    says why in the run's log) and `on` is an error. On a CPU XLA is off by default anyway.

    Raises:
      ConfigError: `on` with several local replicas, across CPU workers, or with --deterministic on a GPU.
    """
    if requested == "off":
        return False
    if deterministic and gpus > 0:
        if requested == "on":
            raise ConfigError(
                f"--jit_compile on does not combine with --deterministic on a GPU ({DETERMINISTIC_NO_XLA})"
            )
        return False
    if multiworker and gpus == 0:
        if requested == "on":
            raise ConfigError(
                "--jit_compile on with --strategy multiworker needs GPUs: XLA has no collective ops on CPU "
                "devices; use --jit_compile off"
            )
        return False
    if local_replicas > 1:
        if requested == "on":
            raise ConfigError(
                f"--jit_compile on cannot compile a step spanning {local_replicas} devices of one process "
                "(Keras 3 under MirroredStrategy); use --jit_compile off, or one process per GPU with "
                f"--strategy multiworker and {TF_CONFIG}"
            )
        return False
    return requested == "on" or gpus > 0


def resolve_precision(requested: str, gpu_capabilities: Sequence[tuple[int, int]] | None = None) -> str:
    """The Keras dtype policy for `--precision`.

    `auto`: mixed_bfloat16 when every GPU has compute capability >= 8.0, mixed_float16 (with Keras's automatic
    loss scaling) on older GPUs, float32 without a GPU. `gpu_capabilities` defaults to the local GPUs'.
    """
    if requested != "auto":
        return requested
    if gpu_capabilities is None:
        gpu_capabilities = _gpu_capabilities()
    if not gpu_capabilities:
        return "float32"
    if min(gpu_capabilities) >= (8, 0):
        return "mixed_bfloat16"
    return "mixed_float16"


def _gpu_capabilities() -> list[tuple[int, int]]:
    import tensorflow as tf

    caps = []
    for gpu in tf.config.list_physical_devices("GPU"):
        cap = tf.config.experimental.get_device_details(gpu).get("compute_capability")
        caps.append(tuple(cap) if cap else (0, 0))
    return caps


def split_cpu(replicas: int) -> None:
    """Splits the CPU into `replicas` logical devices (before TensorFlow initialises its devices).

    Raises:
      ConfigError: TensorFlow already initialised its devices with another split (a fresh process is needed).
    """
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    wanted = [tf.config.LogicalDeviceConfiguration() for _ in range(replicas)]
    try:
        tf.config.set_logical_device_configuration(cpu, wanted)
    except RuntimeError:
        have = len(tf.config.list_logical_devices("CPU"))
        if have != replicas:
            raise ConfigError(
                f"--cpu_replicas {replicas}: TensorFlow already set up {have} CPU device(s) in this process; "
                "run the job in a fresh process"
            ) from None


def make_strategy(kind: str, cpu_replicas: int | None):
    """The tf.distribute strategy `kind` (default, mirrored or multiworker) over this machine's devices."""
    import tensorflow as tf

    if kind == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if kind == "mirrored":
        if tf.config.list_physical_devices("GPU"):
            return tf.distribute.MirroredStrategy()
        cpus = [d.name for d in tf.config.list_logical_devices("CPU")][: cpu_replicas or 1]
        return tf.distribute.MirroredStrategy(devices=cpus)
    return tf.distribute.get_strategy()


def _replica_devices(dist, kind: str) -> tuple[str, ...]:
    """The local devices holding a replica (the default strategy's is TensorFlow's first device)."""
    if kind != "default":
        return tuple(dist.extended.worker_devices)
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return ((gpus or tf.config.list_logical_devices("CPU"))[0].name,)


@dataclasses.dataclass(frozen=True)
class Devices:
    """What a run trains on; recorded in config.json's run section and printed at start.

    Attributes:
      strategy: the tf.distribute object.
      kind: default, mirrored or multiworker.
      devices: the local devices holding a replica.
      replicas: replicas in sync (all machines).
      precision: the Keras dtype policy.
      jit_compile: XLA for the training step.
      cluster: this task of a TF_CONFIG cluster, or None.
    """

    strategy: Any
    kind: str
    devices: tuple[str, ...]
    replicas: int
    precision: str
    jit_compile: bool
    cluster: Cluster | None
    note: str = ""

    @property
    def is_chief(self) -> bool:
        return self.cluster is None or self.cluster.is_chief

    def facts(self) -> dict[str, Any]:
        """The JSON-ready record of the devices (config.json's run section)."""
        facts: dict[str, Any] = {
            "strategy": _CLASS_NAMES[self.kind],
            "devices": list(self.devices),
            "replicas": self.replicas,
            "precision": self.precision,
            "jit_compile": self.jit_compile,
        }
        if self.cluster is not None:
            facts.update(workers=self.cluster.workers, task=self.cluster.task_name)
        return facts

    def describe(self) -> str:
        """One line for the job's log."""
        where = f"; task {self.cluster.task_name} of {self.cluster.workers}" if self.cluster else ""
        return (
            f"devices: {', '.join(self.devices)}; strategy {_CLASS_NAMES[self.kind]} "
            f"({self.replicas} replica(s){where}); precision {self.precision}; "
            f"XLA {'on' if self.jit_compile else 'off'}"
        ) + (f"\n{self.note}" if self.note else "")


def setup(
    strategy: str,
    jit_compile: str,
    precision: str,
    cpu_replicas: int | None,
    backbone: str,
    allow_cpu: bool,
    deterministic: bool = False,
) -> Devices:
    """Checks the device flags, then splits the CPU, creates the strategy and sets the dtype policy.

    Call first, before any other TensorFlow op of the process.

    Raises:
      ConfigError: a bad flag or TF_CONFIG, no GPU for a large backbone, CPU replicas next to GPUs.
    """
    cluster = check_flags(strategy, jit_compile, cpu_replicas, os.environ.get(TF_CONFIG))
    import tensorflow as tf

    gpus = len(tf.config.list_physical_devices("GPU"))
    check_gpus(backbone, gpus, allow_cpu, cpu_replicas)
    kind = choose_strategy(strategy, cluster, gpus, cpu_replicas)
    if cpu_replicas is not None and cpu_replicas > 1:
        split_cpu(cpu_replicas)
    dist = make_strategy(kind, cpu_replicas)
    local = _replica_devices(dist, kind)
    policy = resolve_precision(precision)
    import keras

    keras.mixed_precision.set_global_policy(policy)
    return Devices(
        strategy=dist,
        kind=kind,
        devices=local,
        replicas=int(dist.num_replicas_in_sync),
        precision=policy,
        jit_compile=resolve_jit(jit_compile, gpus, len(local), kind == "multiworker", deterministic),
        cluster=cluster if kind == "multiworker" else None,
        note=DETERMINISTIC_NO_XLA if deterministic and gpus and jit_compile == "auto" else "",
    )


def agree_on_epoch(epoch: int, newest_at_most, epochs_of_all) -> int:
    """The epoch every worker resumes from: the newest one all of them hold a whole backup of.

    A worker killed between two backups leaves the workers one epoch apart; each keeps two slots
    (`rundir.BACKUP_SLOTS_KEPT`), so they can all go back to the older one. Rounds: every worker proposes its
    newest whole backup no later than the lowest proposal so far, until all proposals are equal (0: no
    common backup, the run starts over). Every worker sees the same proposals, so all take the same rounds.

    Args:
      epoch: this worker's newest whole backup (0: none).
      newest_at_most: bound -> this worker's newest whole backup no later than bound (0: none).
      epochs_of_all: this worker's proposal -> every worker's proposal (a collective op in a cluster).
    """
    proposals = epochs_of_all(epoch)
    while min(proposals) != max(proposals):
        proposals = epochs_of_all(newest_at_most(min(proposals)))
    return proposals[0]


def agree_on_backup_epoch(dev: Devices, epoch: int, newest_at_most, max_epoch: int) -> int:
    """`agree_on_epoch` over the workers of a multi-worker run (the epoch itself on one worker)."""
    if dev.cluster is None:
        return epoch
    import tensorflow as tf

    def epochs_of_all(mine: int) -> list[int]:
        """Every worker's proposal, as counts per epoch summed over the replicas (a SUM all-reduce)."""
        index = min(max(mine, 0), max_epoch)

        def one_hot():
            return tf.one_hot(index, max_epoch + 1, dtype=tf.float32)

        counts = dev.strategy.reduce("SUM", dev.strategy.run(one_hot), axis=None).numpy()
        return [e for e, c in enumerate(counts.tolist()) for _ in range(int(round(c)))]

    return agree_on_epoch(epoch, newest_at_most, epochs_of_all)


def shard_by(dataset, policy: str):
    """The dataset split between the workers of a multi-worker run by files (FILE) or records (DATA)."""
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = getattr(tf.data.experimental.AutoShardPolicy, policy)
    return dataset.with_options(options)
