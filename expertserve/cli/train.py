"""Arguments and handler of `expertserve train`, shared with `python -m expertserve.train` (ray job submit)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from expertserve.cli.common import EXIT_OK, UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The train flags. Their defaults live in TrainSettings: here None means "not given"."""
    parser.add_argument(
        "expert_dir", metavar="EXPERT_DIR", help="expert directory (manifest.json and its data)"
    )
    parser.add_argument("--config", metavar="FILE", help="train options as YAML (see configs/train.yaml)")
    parser.add_argument("--workers", type=int, metavar="N", help="Ray Train workers (default 1)")
    parser.add_argument("--gpu", action="store_true", default=None, help="one GPU per worker")
    parser.add_argument(
        "--max-steps", type=int, metavar="N", help="stop after N optimizer steps (overrides the manifest)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the latest run from its latest checkpoint"
    )
    parser.add_argument(
        "--output",
        metavar="DIR",
        help="directory that receives the trained expert and its package (default: EXPERT_DIR)",
    )
    parser.add_argument(
        "--base-model", metavar="DIR", help="base model directory (default: the prepared SmolLM2)"
    )
    parser.add_argument(
        "--base-model-id",
        metavar="ID",
        help="the base model id the manifest names for --base-model (default: the SmolLM2 id)",
    )
    parser.add_argument(
        "--storage",
        metavar="DIR|URI",
        help="runs and checkpoints: a directory or s3://, gs://, hdfs://, abfs://, file:// "
        "(default: $EXPERTSERVE_HOME/runs)",
    )
    parser.add_argument(
        "--version",
        metavar="X.Y.Z",
        help="version of the trained expert (default: the manifest's, patch raised when retraining)",
    )
    parser.add_argument(
        "--max-failures",
        type=int,
        metavar="N",
        help="restarts from the latest checkpoint after a lost worker (default 2)",
    )
    parser.add_argument(
        "--cpus-per-worker", type=float, metavar="C", help="CPUs Ray reserves per worker (default 1)"
    )
    parser.add_argument(
        "--address", metavar="ADDR", help="Ray cluster to join (default: RAY_ADDRESS or a local one)"
    )
    parser.add_argument(
        "--sign-key", metavar="KEY", help="sign the package with this private key (expertserve keygen)"
    )
    parser.add_argument(
        "--publish",
        metavar="DIR|URI",
        help="install the package, once trained, into this directory or expert store (as expertserve install)",
    )
    parser.add_argument(
        "--placement-strategy",
        choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"],
        help="where Ray puts the workers (STRICT_SPREAD: one per node; default PACK)",
    )


def run(args: Any) -> int:
    """Trains, then prints where the expert and its package are."""
    from expertserve.train.launch import train_expert
    from expertserve.train.settings import TrainSettings

    expert_dir = Path(args.expert_dir)
    if not expert_dir.is_dir():
        raise UsageError(f"{expert_dir}: not a directory (expected an expert directory with manifest.json)")
    if args.config and not Path(args.config).is_file():
        raise UsageError(f"{args.config}: config file not found")
    if args.sign_key and not Path(args.sign_key).is_file():
        raise UsageError(f"--sign-key {args.sign_key}: key file not found")
    cli = {name: getattr(args, name) for name in TrainSettings.model_fields}
    try:
        s = TrainSettings.resolve(cli, args.config)
    except ValueError as e:
        raise UsageError(str(e).replace("\n", "; ")) from None
    result = train_expert(expert_dir, s, resume=args.resume)
    loss = (
        f"loss {result.first_loss:.3f} -> {result.last_loss:.3f}"
        if result.first_loss is not None and result.last_loss is not None
        else ""
    )
    print(f"trained {result.expert_dir.name}: {result.steps} steps in {result.seconds:.0f} s, {loss}")
    print(f"expert: {result.expert_dir}\npackage: {result.package}")
    if result.loss_plot:
        print(f"loss curve: {result.loss_plot}")
    if s.publish:
        print(f"published: {_publish(result.package, s.publish)}")
    return EXIT_OK


def _publish(package: Path, where: str) -> str:
    """Installs the trained package into a directory or uploads it to a store (no trust policy here: the server
    that serves it checks the signer)."""
    from expertserve.packaging import archive, store

    if store.is_store(where):
        return store.upload(package, where, force=True)[0]
    return str(archive.install_package(package, Path(where), force=True))
