"""`expertserve`: the command-line entry point.

Every subcommand's module is imported only when that subcommand runs, so `expertserve --help` stays fast.
Exit codes: 0 success, 1 failure (invalid input, failed check), 2 usage error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

from expertserve.cli.common import EXIT_FAIL, EXIT_OK, EXIT_USAGE, UsageError
from expertserve.settings import DEFAULT_MODEL_ID


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser; each subcommand names its handler as `module:function`."""
    parser = argparse.ArgumentParser(
        prog="expertserve",
        description="Train and serve many small experts (adapter + soft prompt + decoding + hints) on one base LLM.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_validate(sub)
    _add_list(sub)
    _add_package(sub)
    _add_verify(sub)
    _add_install(sub)
    _add_keygen(sub)
    _add_train(sub)
    _add_serve(sub)
    _add_route(sub)
    _add_eval(sub)
    _add_bench(sub)
    _add_models(sub)
    _add_tenants(sub)
    return parser


# Commands that start engine or Ray processes: a watchdog ends them if the command dies (expertserve/watchdog.py).
WATCHED = {"serve", "eval", "bench", "train"}


def _add_validate(sub: Any) -> None:
    """`expertserve validate`."""
    p = sub.add_parser(
        "validate",
        help="check expert manifests and report every field's status",
        description="Validate expert directories, manifest files or .expert packages. Prints, per "
        "expert, every field that is set and its status: active, planned or not applicable.",
    )
    p.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="expert directory, manifest.json, .expert package, or a directory of experts",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument(
        "--strict",
        action="store_true",
        help="also check the files the manifest names (adapter, soft prompts, grammar, datasets)",
    )
    p.set_defaults(handler="expertserve.cli.validate:run")


def _add_list(sub: Any) -> None:
    """`expertserve list`."""
    p = sub.add_parser("list", help="list the registered experts (repository experts/ and install directory)")
    p.add_argument(
        "--experts-dir",
        action="append",
        metavar="DIR",
        help="expert root to scan: a directory or a store URI (repeatable; default: ./experts then the install "
        "directory)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler="expertserve.cli.packages:run_list")


def _add_package(sub: Any) -> None:
    """`expertserve package`."""
    p = sub.add_parser("package", help="write <name>-<version>.expert from an expert directory")
    p.add_argument("expert_dir", metavar="EXPERT_DIR")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="directory that receives the package")
    p.add_argument(
        "--sign", metavar="KEY", help="Ed25519 private key (from `expertserve keygen`) to sign with"
    )
    p.set_defaults(handler="expertserve.cli.packages:run_package")


def _add_verify(sub: Any) -> None:
    """`expertserve verify`."""
    p = sub.add_parser("verify", help="check a package's hashes, signature and manifest")
    p.add_argument("file", metavar="FILE")
    p.add_argument(
        "--public-key",
        metavar="KEY",
        help="require a signature by this key (64 hex characters or a .pub file)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler="expertserve.cli.packages:run_verify")


def _add_install(sub: Any) -> None:
    """`expertserve install`."""
    p = sub.add_parser("install", help="verify a package and install it into the install directory")
    p.add_argument("file", metavar="FILE")
    p.add_argument(
        "--dir",
        metavar="DIR",
        help="install directory, or a store URI (s3://, gs://, abfs://, hdfs://, file://) that servers mirror "
        "(default: $EXPERTSERVE_INSTALL_DIR or ~/.cache/expertserve/experts)",
    )
    p.add_argument("--public-key", metavar="KEY", help="require a signature by this key")
    p.add_argument(
        "--trusted-key",
        action="append",
        default=[],
        metavar="KEY",
        help="a trusted signer (64 hex characters or a .pub file; repeatable; also $EXPERTSERVE_TRUSTED_KEYS "
        "and the server config's trusted_keys)",
    )
    p.add_argument(
        "--allow-untrusted",
        action="store_true",
        help="install a package that no trusted key signed (unsigned included); refused otherwise",
    )
    p.add_argument(
        "--config", metavar="FILE", help="server config whose trusted_keys and experts_dirs count too"
    )
    p.add_argument("--force", action="store_true", help="replace an installed copy of the same version")
    p.set_defaults(handler="expertserve.cli.packages:run_install")


def _add_keygen(sub: Any) -> None:
    """`expertserve keygen`."""
    p = sub.add_parser("keygen", help="create an Ed25519 signing key (KEY) and its public key (KEY.pub)")
    p.add_argument("-o", "--output", required=True, metavar="KEY", help="private key file to write")
    p.add_argument("--force", action="store_true", help="overwrite existing key files")
    p.set_defaults(handler="expertserve.cli.packages:run_keygen")


def _add_train(sub: Any) -> None:
    """`expertserve train`."""
    p = sub.add_parser(
        "train", help="train an expert's adapter and soft prompts with Ray Train, then package it"
    )
    from expertserve.cli.train import add_arguments

    add_arguments(p)
    p.set_defaults(handler="expertserve.cli.train:run")


def _add_serve(sub: Any) -> None:
    """`expertserve serve`."""
    p = sub.add_parser(
        "serve", help="serve the base model and the experts over an OpenAI-compatible HTTP API"
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="server config (YAML or JSON; see configs/expertserve.yaml); EXPERTSERVE_* environment "
        "variables override it, e.g. EXPERTSERVE_API_KEYS=k1,k2",
    )
    p.add_argument("--host", help="HTTP host (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    p.add_argument(
        "--ignore-manifest-decoding",
        action="store_true",
        help="decode with request > server defaults only, ignoring manifests (for comparisons)",
    )
    p.set_defaults(handler="expertserve.cli.serve:run")


def _add_route(sub: Any) -> None:
    """`expertserve route`."""
    p = sub.add_parser(
        "route", help="show which expert a prompt goes to, or evaluate routing on a labelled file"
    )
    p.add_argument("prompt", nargs="?", metavar="PROMPT", help="the prompt to route")
    p.add_argument(
        "--eval", metavar="FILE", help='labelled JSONL: {"prompt" or "messages", "expert": name or null}'
    )
    p.add_argument(
        "--explain",
        metavar="PROMPT",
        help="route PROMPT and show the evidence: each candidate's score, nearest examples, keywords, the "
        "prompt's intent cues and the margin",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--experts-dir", action="append", metavar="DIR", help="expert root (repeatable)")
    p.add_argument(
        "--base-model",
        default=DEFAULT_MODEL_ID,
        metavar="ID",
        help="the served base model id (experts for other bases are left out)",
    )
    p.add_argument(
        "--bench", action="store_true", help="measure decision latency p50/p99 (shipped and synthetic)"
    )
    p.add_argument("--bench-n", type=int, default=300, metavar="N", help="decisions timed per registry")
    p.add_argument("--synthetic", type=int, default=100, metavar="N", help="synthetic experts for --bench")
    p.set_defaults(handler="expertserve.cli.route:run")


def _add_eval(sub: Any) -> None:
    """`expertserve eval`."""
    p = sub.add_parser("eval", help="score base model and expert on the held-out test split")
    p.add_argument("expert_dir", metavar="EXPERT_DIR")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--limit", type=int, metavar="N", help="evaluate the first N test examples only")
    p.add_argument("--no-write", action="store_true", help="do not write quality_metrics into the manifest")
    p.add_argument(
        "--split",
        choices=["test", "valid"],
        default="test",
        help="the split to score (default test); choose settings on valid, which never writes quality_metrics",
    )
    p.add_argument(
        "--expert-only", action="store_true", help="score the expert alone (no base model, no ablation)"
    )
    p.add_argument("--base-model", metavar="DIR", help="base model directory (default: the prepared SmolLM2)")
    p.add_argument("--base-model-id", metavar="ID", help="the id the manifest names for --base-model")
    p.set_defaults(handler="expertserve.cli.eval:run")


def _add_bench(sub: Any) -> None:
    """`expertserve bench`."""
    p = sub.add_parser(
        "bench",
        help="benchmark against vLLM's own OpenAI server; prints ratios, writes JSON + PNG",
        description="Starts vLLM's OpenAI server (--enable-lora) and expertserve on the same model, "
        "adapters and engine settings, one after the other, runs the same seeded workloads, and prints "
        "the ratios with their targets. Scenarios: stack overhead, 1/8/32 experts mixed vs base only, "
        "cold vs warm TTFT, routing added latency, soft prompt throughput.",
    )
    p.add_argument("--quick", action="store_true", help="the quick size (about 3 minutes here)")
    p.add_argument("--size", choices=["smoke", "quick", "full"], help="workload size (default: full)")
    p.add_argument("--json", metavar="FILE", help="where the JSON goes (default: out/bench/bench-SIZE.json)")
    p.add_argument("--plot", metavar="FILE", help="where the PNG goes (default: the JSON path with .png)")
    p.set_defaults(handler="expertserve.cli.bench:run")


def _add_models(sub: Any) -> None:
    """`expertserve models`."""
    p = sub.add_parser("models", help="base models: prepare the offline default, build tiny test models")
    msub = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    mp = msub.add_parser(
        "prepare", help="convert the offline SmolLM2-135M-Instruct once into the cache and verify it"
    )
    mp.add_argument("--force", action="store_true", help="convert again even when cached")
    mp.set_defaults(handler="expertserve.cli.models:run_prepare")
    mp = msub.add_parser("path", help="print the directory of the prepared default base model")
    mp.set_defaults(handler="expertserve.cli.models:run_path")
    mp = msub.add_parser("tiny", help="write a tiny random model with its tokenizer (for fast tests)")
    mp.add_argument("output", metavar="DIR")
    mp.add_argument("--arch", choices=["llama", "qwen2"], default="llama")
    mp.add_argument("--seed", type=int, default=0)
    mp.set_defaults(handler="expertserve.cli.models:run_tiny")


def _add_tenants(sub: Any) -> None:
    """`expertserve tenants`."""
    p = sub.add_parser("tenants", help="check a tenants file offline; hash a key for key_sha256")
    tsub = p.add_subparsers(dest="tenants_command", metavar="ACTION", required=True)
    tp = tsub.add_parser(
        "check",
        help="check a tenants file (YAML or JSON, `tenants:` at the top) as the server would load it",
        description="Exit 0 when the file loads; 1 with one line per problem, naming the tenant and field.",
    )
    tp.add_argument("file", metavar="FILE")
    tp.add_argument(
        "--config",
        metavar="FILE",
        help="the server config it goes with (its api_keys, admin key and tenants)",
    )
    tp.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    tp.set_defaults(handler="expertserve.cli.tenants:run_check")
    tp = tsub.add_parser("hash", help="print the key_sha256 of a key read from standard input (one line)")
    tp.set_defaults(handler="expertserve.cli.tenants:run_hash")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command; returns its exit code."""
    args = build_parser().parse_args(argv)
    if argv is None and args.command in WATCHED:  # a real command line, not a call from code or a test
        from expertserve import watchdog

        watchdog.start()
    return run_handler(args)


def run_handler(args: argparse.Namespace) -> int:
    """Calls the handler `args.handler` names, mapping errors to exit codes and one-line messages."""
    module_name, func_name = args.handler.split(":")
    from expertserve.errors import ExpertserveError

    try:
        handler = getattr(importlib.import_module(module_name), func_name)
        return int(handler(args) or EXIT_OK)
    except UsageError as e:
        print(f"expertserve {args.command}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ExpertserveError as e:
        lines = (
            str(e).splitlines() if type(e).__name__ in ("ConfigError", "TenantsError") else [str(e)]
        )  # one line per problem
        print("\n".join(f"error: {line}" for line in lines), file=sys.stderr)
        return EXIT_FAIL
    except BrokenPipeError:  # `expertserve validate ... | head`: the reader left; not an error to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAIL
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: say so plainly; the traceback is one variable away
        if os.environ.get("EXPERTSERVE_DEBUG"):
            raise
        print(
            f"internal error: {type(e).__name__}: {e} (set EXPERTSERVE_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return EXIT_FAIL


def _version() -> str:
    from expertserve import __version__

    return __version__


if __name__ == "__main__":
    sys.exit(main())
