"""Early exits on ONNX Runtime CPU: digits ResNet-34 and MobileNetV2-1.0 (64x64), alone and after LayerMerge.

Sections (``--sections cnn,batch``):

* ``cnn`` — per model: the original, ``early_exit:auto=K`` (``--exits``, tolerance ``--tolerance``; heads
  trained and thresholds calibrated on the digits train split), ``layermerge:speedup=--target,importance=local``
  and LayerMerge followed by ``early_exit``. Each is exported to ONNX (batch 1) and run on every test sample in
  ONNX Runtime, the variants interleaved per sample (``--repeat`` alternating runs each, the median kept): mean
  per-sample latency and its ratio to the original's, test accuracy, the exit-rate histogram on the test set,
  the ``If`` nodes in the file and the largest difference between ORT and the torch gated model over the test
  set (with how many samples' top-1 differ).
* ``speculative`` — self-speculative decoding on the zoo decoder (``llama_tiny`` trained on the stdlib corpus):
  drafts are the same model with blocks dropped (``drop_layers:n=N``, ShortGPT ranking on training windows,
  no training), proposing ``--draft-tokens`` tokens per verification step; ``--prompts`` held-out prompts of 32
  tokens, ``--new-tokens`` tokens each. Per draft: prompts whose tokens equal plain greedy decoding with the
  cached decoder, acceptance rate, tokens per verification step, and tokens/s against plain greedy on ONNX
  Runtime (both timed per prompt, interleaved; median of per-prompt ratios).
* ``batch`` — the ResNet-34 early-exit model at batch ``--batch`` under ``policy=split`` (confident samples
  leave, the rest continue as a smaller batch) and ``policy=all`` (the batch continues unless every sample is
  confident): per-sample latency over the test set, interleaved, and the outputs' agreement.

Writes ``benchmarks/results/early_exit.{json,md}`` after every section (sections merge into an existing file).

    python benchmarks/early_exit.py [--sections cnn] [--models resnet34]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

import depthfold
from depthfold import zoo
from depthfold.backends import ort as ort_backend
from depthfold.backends.onnx import export_onnx
from depthfold.passes.early_exit import EXIT_META
from depthfold.report import environment
from depthfold.zoo.data import digits_datasets

RESULTS = Path(__file__).parent / "results"
RESOLUTION = 64


def _session(module: torch.nn.Module, example: torch.Tensor, folder: Path, name: str):  # type: ignore[no-untyped-def]
    path = folder / f"{name}.onnx"
    export_onnx(module, (example,), path)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    return ort_backend.create_session(path, threads=1), ops


def _run(session, x: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _per_sample(sessions: dict, x: torch.Tensor, repeat: int) -> dict[str, list[float]]:
    """Per test sample and variant, the median of ``repeat`` runs, variants alternating (order rotated)."""
    names = list(sessions)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(len(x)):
        sample = x[i:i + 1].numpy()
        runs: dict[str, list[float]] = {n: [] for n in names}
        for r in range(repeat):
            for name in names[r % len(names):] + names[:r % len(names)]:
                start = time.perf_counter()
                _run(sessions[name], sample)
                runs[name].append((time.perf_counter() - start) * 1e3)
        for name in names:
            times[name].append(statistics.median(runs[name]))
    return times


def _exit_histogram(result: depthfold.OptimizeResult, x: torch.Tensor) -> dict[str, float] | None:
    model = result.module.meta.get(EXIT_META)
    if model is None:
        return None
    taken = torch.cat([model.exits(x[i:i + 64]) for i in range(0, len(x), 64)])
    names = [e["after"] for e in result.records[-1].details["exits"]] + ["final"]
    return {name: float((taken == k).float().mean()) for k, name in enumerate(names)}


def _variants(name: str, exits: int, tolerance: float, target: float) -> dict[str, list[str]]:
    gate = f"early_exit:auto={exits},tolerance={tolerance}"
    merge = f"layermerge:speedup={target},importance=local"
    return {"original": [], "early_exit": [gate], "layermerge": [merge], "layermerge+early_exit": [merge, gate]}


def bench_cnn(models: list[str], exits: int, tolerance: float, target: float, repeat: int) -> dict:
    train, test = digits_datasets(RESOLUTION)
    x, y = test.tensors
    out: dict = {}
    for name in models:
        model = zoo.pretrained_digits(name, RESOLUTION)
        rows: dict = {}
        sessions = {}
        with tempfile.TemporaryDirectory() as tmp:
            for variant, passes in _variants(name, exits, tolerance, target).items():
                start = time.perf_counter()
                if passes:
                    result = depthfold.optimize(model, x[:1], passes, data=train)
                    module = result.module
                else:
                    result, module = None, model
                seconds = time.perf_counter() - start
                sessions[variant], ops = _session(module, x[:1], Path(tmp), variant)
                got = np.concatenate([_run(sessions[variant], x[i:i + 1].numpy()) for i in range(len(x))])
                with torch.no_grad():
                    ref = torch.cat([module(x[i:i + 1]) for i in range(len(x))]).numpy()
                row = {"passes": passes, "optimize_s": seconds, "accuracy": float((got.argmax(-1) == y.numpy()).mean()),
                       "if_nodes": ops.count("If"), "onnx_vs_torch_max_abs": float(np.abs(got - ref).max()),
                       "onnx_vs_torch_top1_differs": int((got.argmax(-1) != ref.argmax(-1)).sum())}
                if result is not None:
                    details = {r.name: r.details for r in result.records}
                    if "early_exit" in details:
                        ee = details["early_exit"]
                        row["exits"] = [{k: e[k] for k in ("after", "threshold", "exit_rate", "latency_fraction",
                                                          "head_agreement")} for e in ee["exits"]]
                        row["calibration"] = {k: ee[k] for k in ("expected_compute", "loss", "loss_metric",
                                                                 "tolerance", "calibration")}
                        row["test_histogram"] = _exit_histogram(result, x)
                    if "layermerge" in details:
                        row["layermerge_measured_speedup"] = details["layermerge"].get("measured_speedup")
                rows[variant] = row
            times = _per_sample(sessions, x, repeat)
        base = float(np.mean(times["original"]))
        for variant, row in rows.items():
            mean = float(np.mean(times[variant]))
            ratios = np.array(times[variant]) / np.array(times["original"])
            row.update({"mean_ms": mean, "latency_vs_original": mean / base,
                        "latency_reduction": 1.0 - mean / base,
                        "per_sample_ratio_median": float(np.median(ratios)),
                        "per_sample_ratio_p10": float(np.quantile(ratios, 0.1)),
                        "per_sample_ratio_p90": float(np.quantile(ratios, 0.9)),
                        "accuracy_drop_points": 100.0 * (rows["original"]["accuracy"] - row["accuracy"])})
        out[name] = {"samples": len(x), "repeat": repeat, "variants": rows}
        print(json.dumps({name: {v: {k: r[k] for k in ("accuracy", "latency_reduction", "if_nodes")}
                                 for v, r in rows.items()}}), flush=True)
    return out


def bench_batch(batch: int, exits: int, tolerance: float, repeat: int) -> dict:
    train, test = digits_datasets(RESOLUTION)
    x, _ = test.tensors
    model = zoo.pretrained_digits("resnet34", RESOLUTION)
    sessions, outputs = {}, {}
    n = len(x) - len(x) % batch
    with tempfile.TemporaryDirectory() as tmp:
        result = depthfold.optimize(model, x[:batch], [f"early_exit:auto={exits},tolerance={tolerance}"], data=train)
        sessions["split"], _ = _session(result.module, x[:batch], Path(tmp), "split")
        exits_taken = result.records[-1].details["exits"]
        fixed = (f"early_exit:after={','.join(e['after'] for e in exits_taken)},"
                 f"thresholds={','.join(str(e['threshold']) for e in exits_taken)},policy=all")
        every = depthfold.optimize(model, x[:batch], [fixed], data=train)  # same exits and thresholds, batch whole
        sessions["all"], _ = _session(every.module, x[:batch], Path(tmp), "all")
        sessions["original"], _ = _session(model, x[:batch], Path(tmp), "original")
        for name, session in sessions.items():
            outputs[name] = np.concatenate([_run(session, x[i:i + batch].numpy()) for i in range(0, n, batch)])
        batches = x[:n].reshape(n // batch, batch, *x.shape[1:])
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for i, b in enumerate(batches):
            names = list(sessions)[i % 3:] + list(sessions)[:i % 3]
            for name in names:
                runs = []
                for _ in range(repeat):
                    start = time.perf_counter()
                    _run(sessions[name], b.numpy())
                    runs.append((time.perf_counter() - start) * 1e3 / batch)
                times[name].append(statistics.median(runs))
    base = float(np.mean(times["original"]))
    return {"batch": batch, "batches": n // batch,
            "per_sample_ms": {k: float(np.mean(v)) for k, v in times.items()},
            "latency_vs_original": {k: float(np.mean(v)) / base for k, v in times.items()},
            "split_vs_all_max_abs": float(np.abs(outputs["split"] - outputs["all"]).max())}


def bench_speculative(prompts: int, new_tokens: int, draft_tokens: list[int]) -> dict:
    model = zoo.pretrained_text("llama_tiny")
    train, val = zoo.split_corpus(zoo.text_corpus())
    data, _ = next(zoo.lm_batches(train, 64, 512, seed=1, num_batches=1))
    held_out, _ = next(zoo.lm_batches(val, 32, prompts, seed=2, num_batches=1))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        full = Path(tmp) / "full"
        depthfold.export_decoder(depthfold.optimize(model, (data[:1],), []), out_dir=full)
        drafts = {}
        for n in (1, 2):
            res = depthfold.optimize(model, (data[:1],), [f"drop_layers:n={n}"], data=data)
            drafts[n] = (Path(tmp) / f"drop{n}", res.records[0].details["removed"])
            depthfold.export_decoder(res, out_dir=drafts[n][0])
        reference = [depthfold.generate(full, p[None], new_tokens) for p in held_out]
        configs = [(n, k) for n in drafts for k in draft_tokens]
        plain: list[float] = []
        runs: dict = {c: [] for c in configs}
        for i, prompt in enumerate(held_out):
            plain.append(depthfold.generate(full, prompt[None], new_tokens, stats=True)[1]["tokens_per_s"])
            for n, k in configs[i % len(configs):] + configs[:i % len(configs)]:
                tokens, stats = depthfold.generate(full, prompt[None], new_tokens, draft=drafts[n][0], draft_tokens=k,
                                                   stats=True)
                runs[(n, k)].append({**stats, "identical": bool(np.array_equal(tokens, reference[i]))})
        for (n, k), got in runs.items():
            rows.append({"draft": f"drop_layers:n={n}", "removed_blocks": drafts[n][1], "draft_tokens": k,
                         "identical": sum(r["identical"] for r in got), "prompts": len(got),
                         "acceptance_rate": float(np.mean([r["acceptance_rate"] for r in got])),
                         "tokens_per_step": float(np.mean([r["tokens_per_step"] for r in got])),
                         "tokens_per_s": float(np.median([r["tokens_per_s"] for r in got])),
                         "speedup_median": float(np.median([r["tokens_per_s"] / p for r, p in zip(got, plain)])),
                         "speedup_p10": float(np.quantile([r["tokens_per_s"] / p for r, p in zip(got, plain)], 0.1)),
                         "speedup_p90": float(np.quantile([r["tokens_per_s"] / p for r, p in zip(got, plain)], 0.9))})
            print(rows[-1], flush=True)
    return {"model": "llama_tiny (zoo, 4 blocks, trained on the stdlib corpus)", "new_tokens": new_tokens,
            "prompt_tokens": 32, "plain_tokens_per_s": float(np.median(plain)), "rows": rows}


def to_markdown(payload: dict) -> str:
    env = payload.get("environment", {})
    lines = ["# Early exits (ONNX Runtime CPU, 1 thread)", "",
             f"torch {env.get('torch')}, onnxruntime {env.get('onnxruntime')}, {env.get('cpu_count')} CPUs. "
             "Generated by `python benchmarks/early_exit.py`.", ""]
    for name, section in payload.get("cnn", {}).items():
        lines += [f"## {name} on digits {RESOLUTION}x{RESOLUTION} ({section['samples']} test samples, batch 1)", "",
                  "| variant | test acc | drop (pts) | mean ms/sample | vs original | per-sample ratio median (p10-p90) | "
                  "If nodes | ORT vs torch max abs (top-1 differs) |",
                  "|---|---|---|---|---|---|---|---|"]
        for variant, r in section["variants"].items():
            lines.append(f"| {variant} | {r['accuracy']:.4f} | {r['accuracy_drop_points']:.2f} | {r['mean_ms']:.3f} | "
                         f"{r['latency_vs_original']:.3f} | {r['per_sample_ratio_median']:.3f} "
                         f"({r['per_sample_ratio_p10']:.3f}-{r['per_sample_ratio_p90']:.3f}) | {r['if_nodes']} | "
                         f"{r['onnx_vs_torch_max_abs']:.2g} ({r['onnx_vs_torch_top1_differs']}) |")
        lines.append("")
        for variant, r in section["variants"].items():
            if "exits" not in r:
                continue
            hist = ", ".join(f"{k} {v:.1%}" for k, v in (r["test_histogram"] or {}).items())
            exits = "; ".join(f"{e['after']} (threshold {e['threshold']:.3f}, prefix {e['latency_fraction']:.2f} of the "
                              f"latency, head agreement {e['head_agreement']:.3f})" for e in r["exits"])
            cal = r["calibration"]
            lines.append(f"- {variant}: exits {exits}. Test exit histogram: {hist}. Calibration: expected compute "
                         f"{cal['expected_compute']:.3f}, {cal['loss_metric']} loss {cal['loss']:.4f} "
                         f"(tolerance {cal['tolerance']}) on {cal['calibration']['held_out']} held-out samples.")
        lines.append("")
    if "speculative" in payload:
        sp = payload["speculative"]
        lines += [f"## Self-speculative decoding ({sp['model']}; ORT CPU, batch 1, {sp['prompt_tokens']}-token prompts, "
                  f"{sp['new_tokens']} new tokens)", "",
                  f"Plain greedy with the KV cache: {sp['plain_tokens_per_s']:.0f} tokens/s (median over prompts).", "",
                  "| draft | blocks removed | draft tokens | identical to greedy | acceptance | tokens/step | tokens/s | "
                  "vs greedy median (p10-p90) |", "|---|---|---|---|---|---|---|---|"]
        for r in sp["rows"]:
            lines.append(f"| {r['draft']} | {r['removed_blocks']} | {r['draft_tokens']} | {r['identical']}/{r['prompts']} | "
                         f"{r['acceptance_rate']:.3f} | {r['tokens_per_step']:.2f} | {r['tokens_per_s']:.0f} | "
                         f"{r['speedup_median']:.3f} ({r['speedup_p10']:.3f}-{r['speedup_p90']:.3f}) |")
        lines.append("")
    if "batch" in payload:
        b = payload["batch"]
        lines += [f"## Batch policies (resnet34, batch {b['batch']}, {b['batches']} test batches)", "",
                  "| model | ms per sample | vs original |", "|---|---|---|"]
        for k, v in b["per_sample_ms"].items():
            lines.append(f"| {k} | {v:.3f} | {b['latency_vs_original'][k]:.3f} |")
        lines += ["", f"split vs all outputs: max abs difference {b['split_vs_all_max_abs']:.2g}.", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="cnn,batch,speculative")
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--draft-tokens", default="2,3,4")
    parser.add_argument("--models", default="resnet34,mobilenetv2_100")
    parser.add_argument("--exits", type=int, default=2)
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--target", type=float, default=1.3)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", default=str(RESULTS / "early_exit"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    payload: dict = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    payload["environment"] = environment()
    jobs = {"cnn": lambda: bench_cnn(args.models.split(","), args.exits, args.tolerance, args.target, args.repeat),
            "batch": lambda: bench_batch(args.batch, args.exits, args.tolerance, args.repeat),
            "speculative": lambda: bench_speculative(args.prompts, args.new_tokens,
                                                     [int(k) for k in args.draft_tokens.split(",")])}
    for section in args.sections.split(","):
        payload[section] = jobs[section]()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
        out.with_suffix(".md").write_text(to_markdown(payload))
    print(to_markdown(payload))


if __name__ == "__main__":
    main()
