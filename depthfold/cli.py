"""The ``depthfold`` command line: ``optimize``, ``bench``, ``compile`` and ``demo``."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, DepthfoldError

__all__ = ["main", "split_pass_list", "load_model"]

logger = logging.getLogger("depthfold.cli")


def split_pass_list(text: str) -> list[str]:
    """Split ``"fold_bn,layermerge:speedup=1.8,mode=depth,fuse_qkv"`` into pass specs.

    A comma-separated item with ``=`` but no ``:`` is another option of the previous pass; so is a bare item
    that names no pass after a pass with options (a further value of a list option: ``early_exit:after=1,2``).
    """
    from .passes import list_passes

    known = {p["name"] for p in list_passes()}
    specs: list[str] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        continues = specs and ":" in specs[-1] and ":" not in item and item not in known
        if ("=" in item and ":" not in item) or continues:
            if not specs:
                raise ConfigError(f"pass list {text!r} starts with an option ({item!r}); "
                                  "write 'name:key=value'")
            specs[-1] += "," + item
        else:
            specs.append(item)
    return specs


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        raise ConfigError(f"--input-shape {text!r} must be integers like 1,3,224,224") from None
    if not shape or any(d <= 0 for d in shape):
        raise ConfigError(f"--input-shape {text!r} must be positive integers like 1,3,224,224")
    return shape


def load_model(spec: str, *, resolution: int | None = None, input_shape: str | None = None,
               pretrained: str | None = None) -> tuple[nn.Module, tuple[torch.Tensor, ...], str]:
    """Resolve ``zoo:NAME`` or ``path/to/file.py:factory`` into (model, example inputs, display name).

    A factory returns a model, or ``(model, example_inputs)``; otherwise ``--input-shape`` is needed.
    """
    if spec.startswith("zoo:"):
        from . import zoo

        if input_shape is not None:
            raise ConfigError(f"--input-shape is for factory files that return only a model; {spec} has its own "
                              "inputs (set the image size with --resolution)")
        name = spec[4:]
        if pretrained == "digits":
            model = zoo.pretrained_digits(name, resolution=resolution or 32)
            inputs = zoo.example_inputs(name, resolution=resolution or 32)
        elif pretrained:
            raise ConfigError(f"--pretrained {pretrained!r} is not available; the zoo offers 'digits'")
        else:
            model = zoo.create(name)
            inputs = zoo.example_inputs(name, resolution=resolution)
        return model, inputs, name
    path_text, sep, factory_name = spec.rpartition(":")
    if not sep or not path_text.endswith(".py"):
        raise ConfigError(f"model {spec!r} must be 'zoo:NAME' or 'path/to/file.py:factory'")
    path = Path(path_text)
    if not path.is_file():
        raise ConfigError(f"model file {str(path)!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"_depthfold_user_{path.stem}", path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"cannot import {str(path)!r} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise ConfigError(f"{str(path)!r} has no callable {factory_name!r}")
    made = factory()
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], nn.Module):
        model, inputs = made
        inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    elif isinstance(made, nn.Module):
        if input_shape is None:
            raise ConfigError(f"{factory_name}() returned only a model; pass --input-shape 1,3,224,224 "
                              "or return (model, example_inputs)")
        model, inputs = made, (torch.randn(_parse_shape(input_shape)),)
    else:
        raise ConfigError(f"{factory_name}() must return an nn.Module or (model, example_inputs), "
                          f"got {type(made).__name__}")
    return model, inputs, f"{path.stem}:{factory_name}"


def load_data(spec: str | None, inputs: tuple[Any, ...]) -> Any:
    """Calibration data for ``--data``: ``digits`` (the train split at the model's resolution) or an ``.npz``
    file holding ``x`` (and optionally ``y``) arrays. Loaded without pickle."""
    if spec is None:
        return None
    shape = tuple(inputs[0].shape)
    if spec == "digits":
        from .zoo import digits_datasets

        train, _ = digits_datasets(resolution=shape[-1], channels=shape[1])
        return train
    path = Path(spec)
    if path.suffix != ".npz" or not path.is_file():
        raise ConfigError(f"--data {spec!r}: expected 'digits' or an existing .npz file with arrays 'x' [and 'y']")
    import numpy as np

    with np.load(path, allow_pickle=False) as npz:
        if "x" not in npz:
            raise ConfigError(f"--data {spec!r} has no array 'x' (found: {', '.join(npz.files)}); save the inputs "
                              "as np.savez(path, x=inputs, y=labels)")
        x = torch.from_numpy(npz["x"]).float()
        y = torch.from_numpy(npz["y"]).long() if "y" in npz else None
    return (x, y) if y is not None else x


def _cmd_optimize(args: argparse.Namespace) -> int:
    from .api import DEFAULT_PASSES, optimize

    model, inputs, name = load_model(args.model, resolution=args.resolution, input_shape=args.input_shape,
                                     pretrained=args.pretrained)
    passes = split_pass_list(args.passes) if args.passes else list(DEFAULT_PASSES)
    data = load_data(args.data or ("digits" if args.pretrained == "digits" else None), inputs)
    result = optimize(model, inputs, passes, max_steps=args.max_steps, dump_dir=args.dump_dir,
                      progress=not args.quiet, data=data, backend=args.backend, device=args.device,
                      target=args.target, threads=args.threads, executor=args.executor)
    result.report["model"]["name"] = name
    paths = result.save(args.out, measure=args.measure)
    summary = result.report["summary"]
    print(f"{name}: nodes {summary['before']['nodes']} -> {summary['after']['nodes']}, "
          f"params {summary['before']['params']:,} -> {summary['after']['params']:,}; "
          f"max relative error {summary['verification'].get('max_rel', float('nan')):.2e}")
    if "latency" in result.report:
        latency = result.report["latency"]
        print(f"{latency['backend']} {latency['target']} latency speed-up: {latency['speedup']['median']:.3f}x")
    for key, path in paths.items():
        print(f"wrote {path}  ({key})")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.artifact is None:
        return _cmd_bench_plan(args)
    import numpy as np

    from .backends import Target, get_backend, ort

    if (Path(args.artifact) / "artifact.json").is_file():  # a TVM artifact directory from `depthfold compile`
        return _cmd_bench_tvm(args)
    if args.remote:
        raise ConfigError("--remote times TVM artifacts (a directory from `depthfold compile`) on a TVM RPC "
                          f"server; {args.artifact!r} is not one")

    files = [Path(args.artifact), *(Path(p) for p in args.compare)]
    backend = get_backend("onnxruntime", Target.parse(None, device=args.device), threads=args.threads,
                          warmup=args.warmup)
    rng = np.random.default_rng(0)
    inputs = [_random_input(i, rng) for i in ort.create_session(files[0]).get_inputs()]
    result = backend.compare({str(f): f for f in files}, inputs, rounds=args.repeat)
    rows = []
    for name, m in result["measurements"].items():
        ratio = result["ratios"][name]
        rows.append({"artifact": name, "median_ms": m.median_ms, "p90_ms": m.p90_ms, "min_ms": m.min_ms, "n": m.n,
                     "ratio_vs_first": ratio["median"], "ratio_p10": ratio["p10"], "ratio_p90": ratio["p90"]})
        print(f"{name}: median {m.median_ms:.3f} ms, p90 {m.p90_ms:.3f} ms, n={m.n}, "
              f"{args.threads} thread(s), {args.device}"
              + (f"; x{ratio['median']:.3f} of {files[0].name}" if name != str(files[0]) else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def _cmd_bench_plan(args: argparse.Namespace) -> int:
    from .bench import default_plan, quick_plan, run_bench
    from .report import read_report, render_headline

    threads = args.threads
    plan = quick_plan(threads=threads, device=args.device) if args.quick else \
        default_plan(threads=threads, device=args.device)
    plan = plan.select(tuple(_names(args.models)), tuple(_names(args.pipelines)))
    if args.lanes:
        plan = dataclasses.replace(plan, lanes=tuple(_names(args.lanes)))
    if args.rounds:
        plan = dataclasses.replace(plan, rounds=args.rounds)
    paths = run_bench(plan, args.out, force=args.force, progress=not args.quiet,
                      command="depthfold " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else None)
    print(render_headline(read_report(paths["json"])), end="")
    for kind, path in paths.items():
        print(f"wrote {path}  ({kind})")
    return 0


def _names(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import read_report, render_headline

    report = read_report(args.file)
    if args.action == "validate":
        print(f"{args.file}: valid depthfold bench report (schema {report['schema_version']}, device "
              f"{report['device']['id']}, {len(report['cells'])} cells)")
    elif args.action == "render":
        from .bench import write_report

        out = Path(args.out) if args.out else Path(args.file).parent
        for kind, path in write_report(report, out).items():
            print(f"wrote {path}  ({kind})")
    else:  # headline
        table = render_headline(report)
        if args.readme:
            _replace_block(Path(args.readme), table)
            print(f"updated the headline block of {args.readme}")
        else:
            print(table, end="")
    return 0


HEADLINE_BEGIN = "<!-- headline: generated by `depthfold report headline FILE --readme README.md` -->"
HEADLINE_END = "<!-- /headline -->"


def _replace_block(path: Path, table: str) -> None:
    from ._atomic import atomic_write

    text = path.read_text()
    if HEADLINE_BEGIN not in text or HEADLINE_END not in text:
        raise ConfigError(f"{path} has no headline block; add the two lines {HEADLINE_BEGIN!r} and "
                          f"{HEADLINE_END!r} where the table goes")
    head, _, rest = text.partition(HEADLINE_BEGIN)
    _, _, tail = rest.partition(HEADLINE_END)
    new = f"{head}{HEADLINE_BEGIN}\n{table}{HEADLINE_END}{tail}"
    atomic_write(path, lambda p: p.write_text(new))


def _cmd_bench_tvm(args: argparse.Namespace) -> int:
    import numpy as np

    from .backends import tvm as tvm_backend

    if args.compare:
        raise ConfigError("--compare is for ONNX files; time TVM artifacts one at a time")
    art = tvm_backend.TvmArtifact.load(args.artifact)
    if art.reference is not None:
        with np.load(art.reference) as z:
            inputs = [z[f"in{i}"] for i in range(len(art.inputs))]
    else:
        rng = np.random.default_rng(0)
        inputs = [rng.standard_normal(s.shape).astype(s.dtype) if "float" in s.dtype
                  else rng.integers(0, 100, size=s.shape).astype(s.dtype) for s in art.inputs]
    m = tvm_backend.measure(art, inputs, warmup=args.warmup, repeat=args.repeat, threads=args.threads,
                            remote=args.remote)
    where = f"remote {args.remote}" if args.remote else "this machine"
    print(f"{args.artifact} ({art.target}, on {where}): median {m.median_ms:.3f} ms, p90 {m.p90_ms:.3f} ms, "
          f"n={m.n}, {args.threads} thread(s)")
    if args.json:
        record = {"artifact": str(args.artifact), "target": art.target, "remote": args.remote, **m.to_dict()}
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return 0


def _cmd_compile(args: argparse.Namespace) -> int:
    from .backends import tvm as tvm_backend

    source: Any
    inputs: Any = None
    if args.model.startswith("zoo:") or ".py:" in args.model:
        source, inputs, _ = load_model(args.model, resolution=args.resolution, input_shape=args.input_shape,
                                       pretrained=args.pretrained)
    else:
        source = Path(args.model)  # model.onnx, or a `depthfold optimize` output directory holding one
    art = tvm_backend.compile(source, inputs, args.target, mcpu=args.mcpu, arch=args.arch,
                              tune_trials=args.tune_trials, out_dir=args.out, frontend=args.frontend)
    ver = art.meta.get("verification")
    print(f"wrote {art.library} and {art.path / 'artifact.json'} ({art.target}, {art.meta['frontend']} frontend"
          + (f", max relative error vs torch {ver['max_rel_error']:.2e}" if ver else ", not run here") + ")")
    if art.meta.get("frontend_note"):
        print(f"note: {art.meta['frontend_note']}")
    return 0


def _random_input(info: Any, rng: Any) -> Any:
    import numpy as np

    shape = [d if isinstance(d, int) and d > 0 else 1 for d in info.shape]
    if "int" in info.type:
        return rng.integers(0, 100, size=shape, dtype=np.int64)
    if "bool" in info.type:
        return rng.random(shape) > 0.5
    return rng.standard_normal(shape).astype(np.float32)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .bench import demo_plan, run_bench
    from .report import headline_rows, read_report

    plan = demo_plan()
    (model,) = plan.models
    print(f"depthfold demo: {model.name} trained on scikit-learn digits ({model.resolution}x{model.resolution}), "
          f"pipelines {', '.join(p.name for p in model.pipelines)}; timed on ONNX Runtime CPU against torch eager "
          "and onnxslim (a few minutes on a fresh machine)")
    paths = run_bench(plan, args.out, force=args.force, progress=not args.quiet, command="depthfold demo")
    report = read_report(paths["json"])
    (row,) = headline_rows(report)
    cell = row["cell"]
    if cell is None:
        print(f"no pipeline kept accuracy within a point of the original; see {paths['md']}")
        return 1
    s, q = row["speedup"], cell["quality"]
    onnx_file = paths["json"].parent / "cells" / model.name / f"{cell['pipeline']}.onnx"
    print(f"{model.name} (digits): {cell['pipeline']} runs {s['median']:.2f}x faster on ONNX Runtime "
          f"(p10-p90 {s['p10']:.2f}-{s['p90']:.2f}), accuracy {100 * q['original']:.2f}% -> {100 * q['value']:.2f}%; "
          f"ONNX {onnx_file}; report {paths['html']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="depthfold", description=__doc__)
    parser.add_argument("--quiet", action="store_true", help="no progress bars or info logging")
    sub = parser.add_subparsers(dest="command", required=True)

    opt = sub.add_parser("optimize", help="optimize a model and write model.onnx + report")
    opt.add_argument("model", help="zoo:NAME or path/to/file.py:factory")
    opt.add_argument("--passes", help="comma-separated pass specs (default: fold_bn,merge_linear_chains)")
    opt.add_argument("--out", required=True, help="output directory")
    opt.add_argument("--resolution", type=int, help="input resolution for zoo vision models")
    opt.add_argument("--input-shape", help="input shape for a factory that returns only a model")
    opt.add_argument("--pretrained", choices=["digits"], help="train (or load cached) zoo weights on digits")
    opt.add_argument("--max-steps", type=int, default=1, help="repeat the pipeline until nothing changes")
    opt.add_argument("--dump-dir", help="write graph code before/after each pass here")
    opt.add_argument("--measure", action="store_true",
                     help="also time original vs optimized, interleaved, on the planned backend and target")
    opt.add_argument("--data", help="calibration data for layermerge: 'digits' (default with --pretrained digits) "
                                    "or an .npz file with arrays x [and y]")
    opt.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "tvm", "torch"],
                     help="where latency-driven passes measure (the deployment backend)")
    opt.add_argument("--device", choices=["cpu", "cuda"], help="this machine's CPU (default) or GPU")
    opt.add_argument("--target", help="where the model will run: x86, aarch64, cuda or ARCH-DEVICE (default: this "
                                      "machine with --device)")
    opt.add_argument("--threads", type=int, default=1)
    opt.add_argument("--executor", default=None, choices=["process", "serial", "ray"],
                     help="where table-building jobs run (default: a local process pool)")
    opt.set_defaults(func=_cmd_optimize)

    bench = sub.add_parser("bench", help="run the benchmark plan (zoo x pipelines x backends) and write "
                                         "out/bench/<device>/report.{json,md,html}; or time given artifacts")
    bench.add_argument("artifact", nargs="?", help="instead of the plan: time this model.onnx (interleaved with "
                                                   "--compare), or a TVM artifact directory from `depthfold compile`")
    bench.add_argument("--out", default="out/bench", help="plan: reports go to OUT/<device-id>/")
    bench.add_argument("--quick", action="store_true", help="plan: a small subset (about a minute)")
    bench.add_argument("--force", action="store_true", help="plan: re-measure cells already saved")
    bench.add_argument("--models", help="plan: only these models (comma-separated)")
    bench.add_argument("--pipelines", help="plan: only these pipelines (comma-separated; original always runs)")
    bench.add_argument("--lanes", help="plan: backend lanes for the pipelines (default onnxruntime,tvm)")
    bench.add_argument("--rounds", type=int, help="plan: interleaved timing rounds (default 20; quick 10)")
    bench.add_argument("--compare", nargs="*", default=[], help="more .onnx files to time against it")
    bench.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    bench.add_argument("--threads", type=int, default=1)
    bench.add_argument("--repeat", type=int, default=50)
    bench.add_argument("--warmup", type=int, default=5)
    bench.add_argument("--json", help="also write the numbers to this JSON file")
    bench.add_argument("--remote", help="TVM artifacts: host:port of a TVM RPC server to time on")
    bench.set_defaults(func=_cmd_bench)

    comp = sub.add_parser("compile", help="compile a model with TVM for x86, aarch64 or cuda")
    comp.add_argument("model", help="zoo:NAME, path/to/file.py:factory, model.onnx or a `depthfold optimize` "
                                    "output directory")
    comp.add_argument("--target", default="x86", choices=["x86", "aarch64", "cuda"])
    comp.add_argument("--out", required=True, help="artifact directory (model.so + artifact.json)")
    comp.add_argument("--mcpu", help="LLVM CPU, e.g. cortex-a72 (Raspberry Pi 4), cortex-a76 (Pi 5)")
    comp.add_argument("--arch", help="CUDA arch, e.g. sm_90")
    comp.add_argument("--tune-trials", type=int, default=0, help="MetaSchedule trial budget (0: untuned)")
    comp.add_argument("--frontend", default="auto", choices=["auto", "torch", "onnx"])
    comp.add_argument("--resolution", type=int, help="input resolution for zoo vision models")
    comp.add_argument("--input-shape", help="input shape for a factory that returns only a model")
    comp.add_argument("--pretrained", choices=["digits"], help="train (or load cached) zoo weights on digits")
    comp.set_defaults(func=_cmd_compile)

    rep = sub.add_parser("report", help="check, re-render or summarise a bench report.json")
    rep.add_argument("action", choices=["validate", "render", "headline"],
                     help="validate: against the versioned schema; render: rewrite report.md and report.html "
                          "from the JSON; headline: print the headline table (or write it into --readme)")
    rep.add_argument("file", help="a bench report.json")
    rep.add_argument("--out", help="render: output directory (default: beside the JSON)")
    rep.add_argument("--readme", help="headline: replace the generated headline block in this markdown file")
    rep.set_defaults(func=_cmd_report)

    demo = sub.add_parser("demo", help="end-to-end run on a built-in model")
    demo.add_argument("--out", default="out/demo", help="the report goes to OUT/<device-id>/")
    demo.add_argument("--force", action="store_true", help="re-measure instead of reusing a previous demo run")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("torch", "onnxscript", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    in_main = threading.current_thread() is threading.main_thread()  # signal handlers can only be set there
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main else None
    try:
        return int(args.func(args))
    except DepthfoldError as err:
        print(f"depthfold: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        signum = stop.args[0] if stop.args and isinstance(stop.args[0], int) else signal.SIGINT
        print(f"depthfold: stopped by {signal.Signals(signum).name}. Nothing half-written was left; finished "
              "latency and importance entries and trained weights are cached, so the same command resumes "
              "from them", file=sys.stderr)
        return 128 + signum
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, _frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so temporary files are removed and locks released on the way out."""
    raise KeyboardInterrupt(signum)


if __name__ == "__main__":
    sys.exit(main())
