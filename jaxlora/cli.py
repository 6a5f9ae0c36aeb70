"""The `jaxlora` command line. Every command turns a known bad input into one line on stderr
and exit status 2."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from jaxlora import __version__, runtime
from jaxlora.errors import JaxloraError
from jaxlora.llm import status
from jaxlora.plan import DEVICES


class _Parser(argparse.ArgumentParser):
    """argparse with the house error format: one line, the fix named, exit status 2 (argparse
    itself prints the whole usage block first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _port(text: str) -> int:
    port = _int_at_least(0)(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"a port is at most 65535, got {port}")
    return port


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _fraction(text: str) -> float:
    value = _positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _setup_distributed(args: argparse.Namespace) -> None:
    runtime.setup_distributed(
        args.cpu_devices,
        args.coordinator,
        args.distributed_auto,
        args.num_processes,
        args.process_id,
    )


def _load(args: argparse.Namespace):
    from jaxlora.config import load_config

    return load_config(args.config, args.set or ())


def _train(args: argparse.Namespace) -> int:
    config = _load(args)
    _setup_distributed(args)
    import jax

    from jaxlora.evaluate import plural
    from jaxlora.sweep import SweepJob, output_lines

    job = SweepJob(
        config,
        args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    result = job.run()
    if jax.process_index() != 0:
        return 0
    out = Path(args.out)
    if "interrupted_at" in result:
        print(
            f"jaxlora: {result['signal']}: checkpoint saved at step {result['interrupted_at']}; "
            f"resume with: jaxlora train {out / 'config.yaml'} --out {out} --resume",
            file=sys.stderr,
        )
        return 0
    print(
        f"trained {plural(len(result['summary']), 'adapter')} -> {out / 'adapters'}; "
        f"summary: {out / 'train_summary.csv'}"
    )
    for line in output_lines(out):  # the job's last lines: results, reports, plots
        print(line)
    return 0


def _eval(args: argparse.Namespace) -> int:
    _setup_distributed(args)
    from jaxlora.evaluate import plural, run_eval
    from jaxlora.sweep import output_lines

    rows = run_eval(args.run_dir, args.set or (), progress=not args.no_progress)
    import jax

    if jax.process_index() == 0:
        print(f"evaluated {plural(len(rows), 'adapter')}")
        for line in output_lines(args.run_dir):
            print(line)
    return 0


def _memory(args: argparse.Namespace) -> int:
    from jaxlora.evaluate import plural
    from jaxlora.memory.evaluate import run_memory
    from jaxlora.memory.results import RESULTS, set_dir
    from jaxlora.sweep import output_lines

    rows = run_memory(args.run_dir, args.set or (), not args.no_progress, args.out, args.resume)
    out = set_dir(Path(args.run_dir), args.out)
    print(f"evaluated {plural(len(rows), 'memory method')} -> {out / RESULTS}")
    for line in output_lines(out, memory_only=True):  # the set's results, report and plots
        print(line)
    return 0


def _report(args: argparse.Namespace) -> int:
    from jaxlora.report import write_report

    path = write_report(args.run_dir, metric=args.metric, tau=args.tau)
    print(f"wrote {path} and plots in {Path(args.run_dir) / 'plots'}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from jaxlora.plan import PlanError, make_plan

    config = _load(args)
    if args.aot and (args.device_memory is not None or args.peak_tflops is not None):
        raise PlanError("--aot takes each chip's memory and speed from TOPOLOGY; drop the override")
    if args.aot:
        return _plan_aot(args, config)
    if args.json:
        raise PlanError("--json reports the compiler's figures: add --aot TOPOLOGY")
    if args.devices is None:
        raise PlanError("plan needs --devices N (or --aot TOPOLOGY, whose chips it counts)")
    device = args.device or "h100"
    memory, peak = DEVICES[device]
    if args.device_memory is not None:
        memory = args.device_memory * 2**30
    if args.peak_tflops is not None:
        peak = args.peak_tflops * 1e12
    platform = "tpu" if device.startswith("tpu") else "gpu"
    plan = make_plan(
        config, args.devices, memory / 2**30, peak / 1e12, args.mfu, args.context, platform
    )
    print(plan.render())
    if not plan.fits:
        raise PlanError(
            f"the job needs {plan.total / 2**30:.1f} GiB per device but a {device} has "
            f"{memory / 2**30:.1f} GiB; use more devices, fsdp/tensor sharding, model.remat=block, "
            "a smaller sweep per job, or a smaller batch"
        )
    return 0


def _plan_aot(args: argparse.Namespace, config) -> int:
    """`plan --aot`, imported only here: libtpu probes for TPUs when its backend starts."""
    from jaxlora.aot_job import run_cli

    return run_cli(config, args.aot, args.devices, args.device, args.mfu, args.context, args.json)


def _convert(args: argparse.Namespace) -> int:
    from jaxlora.fsutil import check_new_dir, staged_dir
    from jaxlora.models import convert, load_pretrained

    out = Path(args.out_dir)
    check_new_dir(out, overwrite=args.overwrite)
    model = load_pretrained(args.source, dtype=args.dtype)
    source = Path(args.source) if Path(args.source).is_dir() else None
    with staged_dir(out, overwrite=args.overwrite) as tmp:
        convert.save_orbax(tmp, source, model.config, model.params, model.tokenizer)
    print(f"wrote {model.num_params:,} parameters ({args.dtype}) to {out}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from jaxlora.llm.serve import load_service, serve

    adapters = {}
    for spec in args.adapters or ():
        name, sep, path = spec.partition("=")
        if not (sep and name and path):
            raise JaxloraError(f"--adapters {spec!r}: expected NAME=PEFT_DIR")
        adapters[name] = path
    memory, model = None, None
    if args.memory is None and (args.set or args.memory_library):
        raise JaxloraError("--set and --memory-library configure --memory; add --memory METHOD")
    if args.memory is not None and args.dtype is not None:
        raise JaxloraError("--dtype does not apply with --memory: the run's model.dtype is served")
    if args.memory is not None:
        from jaxlora.config import load_config
        from jaxlora.job import Job
        from jaxlora.memory.service import MemoryHook

        config_file = Path(args.model) / "config.yaml"
        if not config_file.exists():
            raise JaxloraError(
                f"--memory needs a run directory trained with data.units: {args.model}"
            )
        job = Job(load_config(config_file, args.set or ()))
        memory, model = MemoryHook(job, args.model, args.memory, args.memory_library), job.model
    service = load_service(
        args.model,
        adapters,
        dtype=args.dtype,
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        memory=memory,
        model=model,
        timeout_s=args.request_timeout,
    )
    return serve(service, args.host, args.port, args.api_key, warm_up=not args.no_warmup)


def _llm_settings(args: argparse.Namespace) -> dict:
    return {
        "backend": args.llm_backend,
        "model": args.llm_model,
        "base_url": args.base_url,
        "api_key_env": args.api_key_env,
    }


def _synth(args: argparse.Namespace) -> int:
    from jaxlora.llm.synth import run_synth, summary_lines

    out, report = run_synth(
        args.source,
        out=args.out,
        formats=args.formats,
        mixes=args.mix or (),
        mix_total=args.mix_total,
        counts=args.count or (),
        templates=args.template or (),
        overrides={
            k: v
            for k, v in (
                ("temperature", args.temperature),
                ("top_p", args.top_p),
                ("max_tokens", args.max_tokens),
            )
            if v is not None
        },
        llm=_llm_settings(args),
        seed=args.seed,
        max_attempts=args.max_attempts,
        batch_size=args.batch_size,
        cache=args.cache,
        progress=not args.no_progress,
    )
    for line in summary_lines(report):
        print(line)
    cache = report["cache"]
    print(
        f"wrote {out} (report: {out / 'synth_report.json'}; "
        f"{cache['hits']} cached, {cache['misses']} generated)"
    )
    return status.exit_status("synth", report["short"], report["requested"], args.allow_short)


def _judge(args: argparse.Namespace) -> int:
    from jaxlora.llm.judge import format_summary, run_judge

    out, summary = run_judge(
        args.predictions,
        out=args.out,
        config=args.config,
        llm=_llm_settings(args),
        cache=args.cache,
        template=args.template,
        max_tokens=args.max_tokens,
        progress=not args.no_progress,
    )
    print(f"{format_summary(summary)} -> {out}")
    return status.exit_status("judge", summary["judge_failed"], summary["total"], args.allow_short)


def _add_llm_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LLM (or a config's llm: section)")
    g.add_argument("--llm-backend", choices=["local", "openai"], help="in process or HTTP")
    g.add_argument("--llm-model", help="local: model path, preset or run dir; openai: model name")
    g.add_argument("--base-url", help="openai: the endpoint, e.g. http://127.0.0.1:8000/v1")
    g.add_argument("--api-key-env", help="openai: environment variable holding the API key")
    g.add_argument("--cache", help="result cache file (SQLite)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run configuration (YAML); keys in configs/README.md")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set training.lr=1e-4 (repeatable)",
    )


def _add_distributed_args(p: argparse.ArgumentParser) -> None:
    dist = p.add_argument_group("devices and processes")
    dist.add_argument(
        "--cpu-devices",
        type=_int_at_least(0),
        help="simulate this many CPU devices (testing meshes on one machine)",
    )
    dist.add_argument("--coordinator", help="host:port of process 0 for multi-process runs")
    dist.add_argument("--num-processes", type=_int_at_least(1), help="number of processes")
    dist.add_argument("--process-id", type=_int_at_least(0), help="this process's index")
    dist.add_argument(
        "--distributed-auto",
        action="store_true",
        help="jax.distributed.initialize() from the cluster environment (TPU pods, SLURM)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jaxlora", description=__doc__)
    parser.add_argument("--version", action="version", version=f"jaxlora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train every adapter of a config's grid in one job")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="run directory (checkpoints, adapters, summaries)")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last checkpoint"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also print what the job chose for its auto settings (layout, adapters per pass, "
        "packing)",
    )
    _add_distributed_args(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="evaluate every adapter of a finished run on its own knowledge")
    p.add_argument("run_dir", help="a run directory written by jaxlora train")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a key of the run's config, e.g. --set eval.max_new_tokens=20",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_distributed_args(p)
    p.set_defaults(func=_eval)

    p = sub.add_parser(
        "memory", help="evaluate a run's adapter library as a memory (routers, merges, ICL, RAG)"
    )
    p.add_argument("run_dir", help="a run directory trained with data.units")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a key of the run's config, e.g. --set 'memory.methods=[oracle,bm25@3/ties]'",
    )
    p.add_argument(
        "--out",
        metavar="NAME",
        help="write the separate result set RUN/memory_sets/NAME/ (default: RUN/memory_*); each "
        "method's rows replace its own in the set as it finishes, and the others are kept",
    )
    p.add_argument("--resume", action="store_true", help="skip the methods the set already holds")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_memory)

    p = sub.add_parser("report", help="capacity tables and plots from a run's results.csv")
    p.add_argument("run_dir", help="a run directory with results.csv")
    p.add_argument("--metric", default="accuracy", help="the column to analyse (default: accuracy)")
    p.add_argument(
        "--tau",
        type=_fraction,
        default=0.95,
        help="saturation threshold: T_max is the largest size with metric >= tau",
    )
    p.set_defaults(func=_report)

    p = sub.add_parser(
        "plan", help="per-device memory and step time of a config, without running it"
    )
    _add_config_args(p)
    p.add_argument(
        "--devices",
        type=_int_at_least(1),
        help="number of devices of the job (with --aot: the topology's chips, checked if given)",
    )
    p.add_argument(
        "--device",
        choices=sorted(DEVICES),
        help="accelerator: sets memory and peak bf16 FLOP/s (default: h100; with --aot: its chip)",
    )
    p.add_argument(
        "--device-memory",
        type=_positive_float,
        help="memory per device in GiB (overrides --device)",
    )
    p.add_argument(
        "--peak-tflops", type=_positive_float, help="peak TFLOP/s per device (overrides --device)"
    )
    p.add_argument(
        "--mfu",
        type=_fraction,
        default=0.4,
        help="assumed model-FLOPs utilisation for the step time (default: 0.4)",
    )
    p.add_argument(
        "--context",
        type=_int_at_least(1),
        default=0,
        help="also report the memory of a prefill of this many tokens (e.g. 32768)",
    )
    p.add_argument(
        "--aot",
        metavar="TOPOLOGY",
        help="also compile the job for a TPU slice, e.g. v5e:2x4, v5p:2x2x1, v6e:2x4, v4:2x2x1, "
        "on this machine (libtpu's compile-only devices; needs the tpu-aot extra); exit 2 when "
        "a program does not fit",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="with --aot: print the compiler's figures as one JSON object on the last line",
    )
    p.set_defaults(func=_plan)

    p = sub.add_parser(
        "convert", help="convert a Hugging Face checkpoint or GGUF file to jaxlora's Orbax format"
    )
    p.add_argument(
        "source", help="HF model directory, hub id, GGUF file, built-in preset or smollm2-135m"
    )
    p.add_argument("out_dir", help="output directory (Orbax params + config + tokenizer)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="storage dtype of the converted weights (default: float32)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing out_dir")
    p.set_defaults(func=_convert)

    p = sub.add_parser(
        "serve",
        help="an OpenAI-compatible endpoint over a model and its adapters",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "model", help="a run directory (its base + adapters), model dir, hub id or preset"
    )
    p.add_argument("--adapters", nargs="+", metavar="NAME=PEFT_DIR", help="more adapters to serve")
    p.add_argument("--host", default="127.0.0.1", help="address to bind")
    p.add_argument("--port", type=_port, default=8000, help="0: any free port")
    p.add_argument("--api-key", help="require this bearer key (default: %(default)s, no key)")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="compute dtype (default: %(default)s, the run's or the checkpoint's)",
    )
    p.add_argument("--max-batch", type=_int_at_least(1), default=32, help="rows per decode pass")
    p.add_argument(
        "--batch-wait-ms", type=float, default=2.0, help="how long a pass waits for more requests"
    )
    p.add_argument(
        "--no-warmup",
        action="store_true",
        help="report ready without compiling the common decoding programs first",
    )
    p.add_argument(
        "--request-timeout",
        type=_positive_float,
        default=600.0,
        help="seconds a request may wait for its decoding before a 504",
    )
    p.add_argument(
        "--memory",
        metavar="METHOD",
        help="serve model `memory`: the run's library by a method, e.g. bm25 or bm25@3/ties+rag",
    )
    p.add_argument("--memory-library", help="which library of a run with several (its label)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a key of the run's config for --memory, e.g. --set memory.density=0.3",
    )
    p.set_defaults(func=_serve)

    p = sub.add_parser(
        "synth",
        help="training formats (QA, summary, ...) of each unit by an LLM",
        epilog=status.EPILOG,
    )
    p.add_argument(
        "source",
        help="units jsonl ({id, text} per line), a YAML config with a synth: section, or a "
        "training config (its units, cut as jaxlora train cuts them)",
    )
    p.add_argument("--out", help="output directory (one jsonl per format, synth_report.json)")
    p.add_argument(
        "--formats", help="comma-separated: qa, summary, rewrite, paraphrase, original, facts, ..."
    )
    p.add_argument(
        "--mix", action="append", metavar="FMT=P,...", help="a mix, e.g. qa=0.5,summary=0.5"
    )
    p.add_argument("--mix-total", type=_int_at_least(1), default=20, help="items per unit of a mix")
    p.add_argument("--count", action="append", metavar="FMT=N", help="items per unit of a format")
    p.add_argument(
        "--template", action="append", metavar="FMT=PATH", help="a format's prompt template"
    )
    p.add_argument("--temperature", type=float, help="sampling temperature (default 0.6)")
    p.add_argument("--top-p", type=_fraction, help="nucleus sampling (default 0.9)")
    p.add_argument("--max-tokens", type=_int_at_least(1), help="tokens per generation")
    p.add_argument("--seed", type=_int_at_least(0), help="base seed (default 0)")
    p.add_argument("--max-attempts", type=_int_at_least(1), help="rounds of requests (default 3)")
    p.add_argument("--batch-size", type=_int_at_least(1), help="requests per backend call")
    status.add_allow_short(p, "items (records of the written formats and mixes)")
    _add_llm_args(p)
    p.set_defaults(func=_synth)

    p = sub.add_parser(
        "judge",
        help="score predictions against gold answers with an LLM (0-10)",
        epilog=status.EPILOG,
    )
    p.add_argument("predictions", help="jsonl with question (or prompt), answer, prediction")
    p.add_argument("--out", help="judged jsonl (default: PREDICTIONS.judged.jsonl)")
    p.add_argument("--config", help="YAML with an llm: section")
    p.add_argument("--template", help="judge prompt file ({question}, {gold}, {candidate})")
    p.add_argument(
        "--max-tokens",
        type=_int_at_least(1),
        help="tokens of each verdict (default 256); the local judge checks that every prompt "
        "plus these fits its context before sending",
    )
    status.add_allow_short(p, "verdicts (judge failures)")
    _add_llm_args(p)
    p.set_defaults(func=_judge)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # jaxlora uses transformers for tokenizers and configs only: its advice that PyTorch is
    # missing is noise in a runtime-only install.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    runtime.setup_logging(getattr(args, "verbose", False))
    runtime.setup_compilation_cache()
    try:
        return args.func(args)
    except JaxloraError as e:
        print(f"jaxlora: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("jaxlora: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
