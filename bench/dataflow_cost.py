"""CPU-time and cost estimate of a Dataflow run over the competition's set + HPAv18 (docs/dataflow.md).

    python bench/dataflow_cost.py [--workers 10] [--vcpus 4] [--vcpu_hour 0.056] [--gb_hour 0.003557] ...

Nothing here runs on Dataflow: the per-core rates are measurements on this project's 2-core machine
(../shared/FACTS.md and the README's download figures), passed as flags so that better figures can replace
them, and the prices are assumptions (Dataflow batch list prices, us-central1, as published on
cloud.google.com/dataflow/pricing; not checked here: no internet). Time = CPU time / vCPUs of the workers,
without start-up, autoscaling or a Dataflow vCPU being slower than a core here.
"""

from __future__ import annotations

import argparse

COMPETITION = 31_072
HPAV18 = 74_606
STAINS = 4


def estimate(args) -> list[list]:
    samples = COMPETITION + HPAV18
    steps = {
        512: [
            ("download HPAv18, check + resize to 512 px", HPAV18 * STAINS * args.download_resize_ms / 1e3),
            ("preprocess 512 px PNGs", samples / args.rate_512),
        ],
        1024: [
            ("download HPAv18 as served, check", HPAV18 * STAINS * args.download_check_ms / 1e3),
            ("preprocess 2048 px -> 1024 px", samples / args.rate_1024),
        ],
    }
    vcpus = args.workers * args.vcpus
    per_vcpu_hour = (
        args.vcpu_hour + args.gb_per_vcpu * args.gb_hour + args.disk_gb * args.disk_gb_hour / args.vcpus
    )
    rows = []
    for size, parts in steps.items():
        cpu_h = sum(s for _, s in parts) / 3600
        detail = "; ".join(f"{name} {s / 3600:.2f}" for name, s in parts)
        rows.append(
            [
                f"{size} px",
                samples,
                detail,
                f"{cpu_h:.1f}",
                f"{cpu_h / vcpus * 60:.0f}",
                f"{cpu_h * per_vcpu_hour:.2f}",
            ]
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--rate_512", type=float, default=55.0, help="samples/s per core, 512 px (FACTS: 110 on 2)"
    )
    ap.add_argument(
        "--rate_1024", type=float, default=0.7, help="samples/s per core, 2048->1024 px (1.4 on 2)"
    )
    ap.add_argument("--download_check_ms", type=float, default=65.0, help="CPU ms per served 2048 px JPEG")
    ap.add_argument("--download_resize_ms", type=float, default=99.0, help="the same with --image_size 512")
    ap.add_argument("--workers", type=int, default=10)
    ap.add_argument("--vcpus", type=int, default=4, help="vCPUs per worker (n2-standard-4)")
    ap.add_argument("--gb_per_vcpu", type=float, default=4.0, help="memory per vCPU (n2-standard: 4 GB)")
    ap.add_argument("--disk_gb", type=float, default=50.0, help="--disk_size_gb per worker")
    ap.add_argument("--vcpu_hour", type=float, default=0.056, help="USD per vCPU-hour (assumption)")
    ap.add_argument("--gb_hour", type=float, default=0.003557, help="USD per GB-hour of memory (assumption)")
    ap.add_argument("--disk_gb_hour", type=float, default=0.000054, help="USD per GB-hour of PD (assumption)")
    args = ap.parse_args()
    print(
        f"CPU-time estimate, not a Dataflow measurement: {args.workers} workers x {args.vcpus} vCPUs; prices "
        f"assumed {args.vcpu_hour} USD/vCPU-h, {args.gb_hour} USD/GB-h, {args.disk_gb_hour} USD/GB-h of disk"
    )
    print("| size | samples | CPU-hours by step | CPU-hours | minutes | USD |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    for row in estimate(args):
        print("| " + " | ".join(str(v) for v in row) + " |")


if __name__ == "__main__":
    main()
