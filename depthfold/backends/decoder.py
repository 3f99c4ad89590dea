"""The KV-cache decoder artifact: ``decoder.onnx`` + ``decoder.json``, and greedy generation on ONNX Runtime.

``export_decoder`` derives the decode step (:func:`depthfold.passes.kv_cache.decode_step`), checks that it
reproduces the full model (prefill of a prompt, then one token at a time, against the captured graph on the
whole sequence), exports it with symbolic ``batch_size`` / ``sequence_length`` / ``past_sequence_length`` axes,
checks the ONNX file against torch (prefill with an empty cache and a step with a full one) and writes both
files atomically. Inputs and outputs follow Optimum's names (``input_ids``, ``attention_mask``,
``past_key_values.{i}.key`` / ``.value``; ``logits``, ``present.{i}.key`` / ``.value``), KV as ``[batch,
kv_heads, seq, head_dim]``; only layers that own a cache have past/present I/O. ``decoder.json`` records the
layers, owners, the sharing map, heads, head size, dtype and KV bytes per token.

``generate`` runs greedy decoding with that cache; ``stats=True`` also returns prefill latency, decode tokens/s
and KV bytes per token.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch.fx import GraphModule

from .._atomic import atomic_write, ensure_writable_dir
from ..errors import ArtifactError, ConfigError, VerificationError
from ..ir import flatten_outputs
from ..passes.kv_cache import DecodeStep, decode_step
from .onnx import _quiet_exporter

__all__ = ["DecoderArtifact", "export_decoder", "generate", "greedy_reference", "measure_generation"]

logger = logging.getLogger(__name__)

FORMAT = "depthfold-decoder/1"
_TOLERANCE = 1e-4
"""Largest accepted ``max|diff| / max(1, max|ref|)`` of logits: decode step vs full model, ONNX vs torch."""


@dataclass(frozen=True)
class DecoderArtifact:
    onnx_path: Path
    json_path: Path
    meta: dict[str, Any]


def export_decoder(gm: GraphModule, out_dir: str | Path, *, max_length: int | None = None,
                   sample_ids: torch.Tensor | None = None, opset: int | None = None) -> DecoderArtifact:
    """Write ``decoder.onnx`` and ``decoder.json`` for captured causal decoder ``gm`` (not modified).

    Args:
        gm: the captured (and optimized) decoder, taking token ids (and optionally an attention mask).
        out_dir: created if needed; both files are written atomically.
        max_length: longest ``past + seq`` the model supports (position tables), recorded for ``generate``.
        sample_ids: token ids ``[batch, seq >= 4]`` for the checks (default: random ids below the vocabulary).

    Raises:
        PreconditionError: not a decoder the decode step can be derived for.
        VerificationError: the decode step or its ONNX export does not reproduce the full model.
        ArtifactError: export or writing failed.
    """
    step = decode_step(gm)
    out = ensure_writable_dir(out_dir)
    ids = sample_ids if sample_ids is not None else torch.randint(
        0, max(step.vocab_size, 2), (2, 12), generator=torch.Generator().manual_seed(0))
    if ids.dim() != 2 or ids.shape[1] < 4:
        raise ConfigError(f"sample_ids must be [batch, seq >= 4] token ids, got shape {list(ids.shape)}")
    _check_against_full(gm, step, ids)
    model = _to_onnx(step, opset)
    meta = _metadata(step, max_length)
    onnx_path = out / "decoder.onnx"

    def write(tmp: Path) -> None:
        onnx.save_model(model, str(tmp))
        _check_onnx(tmp, step, ids)

    atomic_write(onnx_path, write)
    text = json.dumps(meta, indent=2)
    json_path = atomic_write(out / "decoder.json", lambda p: p.write_text(text + "\n"))
    logger.info("wrote %s: %d layers, cache owners %s, %d KV bytes/token", onnx_path, len(step.sources),
                step.owners, step.kv_bytes_per_token)
    return DecoderArtifact(onnx_path, json_path, meta)


def _metadata(step: DecodeStep, max_length: int | None) -> dict[str, Any]:
    return {
        "format": FORMAT, "inputs": list(step.input_names), "outputs": list(step.output_names),
        "layers": len(step.sources), "owners": step.owners, "sources": step.sources,
        "num_attention_heads": [lay["heads"] for lay in step.layout],
        "num_key_value_heads": [lay["kv_heads"] for lay in step.layout],
        "head_dim": [lay["head_dim"] for lay in step.layout], "dtype": step.dtype,
        "vocab_size": step.vocab_size, "max_length": max_length,
        "kv_bytes_per_token": step.kv_bytes_per_token, "position_ids": False,
        "kv_layout": "[batch, kv_heads, seq, head_dim]",
    }


def _empty_past(step: DecodeStep, batch: int) -> list[torch.Tensor]:
    dtype = getattr(torch, step.dtype)
    return [torch.zeros(batch, step.layout[i]["kv_heads"], 0, step.layout[i]["head_dim"], dtype=dtype)
            for i in step.owners for _ in ("key", "value")]


def _scaled_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).abs().max() / max(1.0, float(ref.abs().max())))


def _full_logits(gm: GraphModule, ids: torch.Tensor) -> torch.Tensor:
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    args = (ids,) if len(names) == 1 else (ids, torch.ones_like(ids))
    with torch.no_grad():
        return flatten_outputs(gm(*args))[0]


def _check_against_full(gm: GraphModule, step: DecodeStep, ids: torch.Tensor) -> None:
    """Prefill half of ``ids``, then feed the rest one token at a time: logits must match the full model's."""
    full = _full_logits(gm, ids)
    batch, length = ids.shape
    split = length // 2
    with torch.no_grad():
        out = step.graph_module(ids[:, :split], torch.ones(batch, split, dtype=torch.long), *_empty_past(step, batch))
        worst = _scaled_error(out[0], full[:, :split])
        for t in range(split, length):
            out = step.graph_module(ids[:, t:t + 1], torch.ones(batch, t + 1, dtype=torch.long), *out[1:])
            worst = max(worst, _scaled_error(out[0][:, 0], full[:, t]))
    if not worst <= _TOLERANCE:
        raise VerificationError(f"the derived decode step does not reproduce the full model (relative logits error "
                                f"{worst:.3g}); the model computes positions or its causal mask in a way the "
                                "KV-cache derivation does not follow (is it a causal decoder?)")


def _to_onnx(step: DecodeStep, opset: int | None) -> onnx.ModelProto:
    batch, seq, past = 2, 3, 4
    args = (torch.zeros(batch, seq, dtype=torch.long), torch.ones(batch, past + seq, dtype=torch.long),
            *[torch.zeros(batch, step.layout[i]["kv_heads"], past, step.layout[i]["head_dim"],
                          dtype=getattr(torch, step.dtype)) for i in step.owners for _ in ("key", "value")])
    auto = torch.export.Dim.AUTO
    shapes = ({0: auto, 1: auto}, {0: auto, 1: auto}, *[{0: auto, 2: auto} for _ in args[2:]])
    with _quiet_exporter():
        try:
            program = torch.onnx.export(step.graph_module, args, dynamo=True, dynamic_shapes=shapes,
                                        input_names=list(step.input_names), output_names=list(step.output_names),
                                        opset_version=opset, optimize=True, external_data=False)
        except Exception as err:
            raise ArtifactError(f"ONNX export of the decode step failed: {type(err).__name__}: "
                                f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}") from err
    model = program.model_proto
    _name_axes(model)
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as err:
        raise ArtifactError(f"the exported decoder fails the ONNX checker: {err}") from err
    return model


def _name_axes(model: onnx.ModelProto) -> None:
    """Rename the exporter's symbols (``s15``, ``s27 + s57``) to ``batch_size``, ``sequence_length`` and
    ``past_sequence_length`` as Optimum names them (the mask's ``past + seq`` axis: ``total_sequence_length``)."""
    inputs = {i.name: i for i in model.graph.input}

    def dims(name: str) -> list[Any]:
        return list(inputs[name].type.tensor_type.shape.dim)

    names = {}
    ids = dims("input_ids")
    names[ids[0].dim_param] = "batch_size"
    names[ids[1].dim_param] = "sequence_length"
    for past in (i for i in inputs if i.startswith("past_key_values.")):
        # One cache length for all layers (the exporter may give each past input a symbol of its own).
        names[dims(past)[2].dim_param] = "past_sequence_length"
    total = dims("attention_mask")[1].dim_param
    if total and total not in names and not re.search(r"[+*]", total):
        names[total] = "total_sequence_length"
    names.pop("", None)
    pattern = re.compile("|".join(rf"\b{re.escape(k)}\b" for k in sorted(names, key=len, reverse=True)))
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = pattern.sub(lambda m: names[m.group(0)], dim.dim_param)


def _check_onnx(path: Path, step: DecodeStep, ids: torch.Tensor) -> None:
    from . import ort

    session = ort.create_session(path, device="cpu", threads=1)
    batch, length = ids.shape
    split = length // 2
    cases = [(ids[:, :split], torch.ones(batch, split, dtype=torch.long), _empty_past(step, batch))]
    with torch.no_grad():
        prefill = step.graph_module(*cases[0][:2], *cases[0][2])
    cases.append((ids[:, split:split + 1], torch.ones(batch, split + 1, dtype=torch.long), list(prefill[1:])))
    for tokens, mask, past in cases:
        with torch.no_grad():
            ref = step.graph_module(tokens, mask, *past)
        got = session.run(None, dict(zip(step.input_names, [t.numpy() for t in (tokens, mask, *past)])))
        for name, g, r in zip(step.output_names, got, ref):
            if tuple(g.shape) != tuple(r.shape):
                raise VerificationError(f"decoder.onnx output {name!r} has shape {list(g.shape)}, torch "
                                        f"{list(r.shape)} (past length {past[0].shape[2] if past else 0})")
            err = _scaled_error(torch.from_numpy(g), r)
            if not err <= _TOLERANCE:
                raise VerificationError(f"decoder.onnx output {name!r} differs from torch by {err:.3g} (relative), "
                                        f"past length {past[0].shape[2] if past else 0}; nothing was written")


def _load(out_dir: str | Path) -> tuple[dict[str, Any], Path]:
    root = Path(out_dir)
    meta_path, onnx_path = root / "decoder.json", root / "decoder.onnx"
    if not meta_path.is_file() or not onnx_path.is_file():
        raise ArtifactError(f"{str(root)!r} holds no decoder.json and decoder.onnx; write them with "
                            "depthfold.export_decoder(...) first")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{str(meta_path)!r} has format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta, onnx_path


class _Decoder:
    """An ONNX Runtime session on a decoder artifact, with its cache layout."""

    def __init__(self, out_dir: str | Path, threads: int):
        from . import ort

        self.meta, path = _load(out_dir)
        self.session = ort.create_session(path, device="cpu", threads=threads)
        self.dtype = np.dtype(self.meta["dtype"])
        self.threads = threads

    def empty(self, batch: int) -> dict[str, np.ndarray]:
        meta = self.meta
        return {name: np.zeros((batch, meta["num_key_value_heads"][int(name.split(".")[1])], 0,
                                meta["head_dim"][int(name.split(".")[1])]), dtype=self.dtype)
                for name in meta["inputs"] if name.startswith("past_key_values.")}

    def step(self, tokens: np.ndarray, past: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Logits for ``tokens`` (``[batch, n]``) after the cached ones, and the grown cache."""
        cached = _cached_length(past)
        batch, count = tokens.shape
        feeds = {"input_ids": tokens, "attention_mask": np.ones((batch, cached + count), dtype=np.int64), **past}
        outputs = self.session.run(None, feeds)
        presents = {name.replace("present.", "past_key_values."): value
                    for name, value in zip(self.meta["outputs"][1:], outputs[1:])}
        return outputs[0], presents


def _check_prompt(meta: dict[str, Any], input_ids: Any, max_new_tokens: int) -> np.ndarray:
    ids = np.asarray(input_ids.numpy() if isinstance(input_ids, torch.Tensor) else input_ids, dtype=np.int64)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] < 1:
        raise ConfigError(f"input_ids must be [seq] or [batch, seq] token ids, got shape {list(ids.shape)}")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    limit = meta.get("max_length")
    if limit is not None and ids.shape[1] + max_new_tokens > limit:
        raise ConfigError(f"prompt ({ids.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                          f"max_length {limit}")
    if meta["vocab_size"] and (ids.min() < 0 or ids.max() >= meta["vocab_size"]):
        raise ConfigError(f"input_ids must lie in [0, {meta['vocab_size']}), got {ids.min()}..{ids.max()}")
    return ids


def generate(out_dir: str | Path, input_ids: Any, max_new_tokens: int = 32, *, eos_token_id: int | None = None,
             threads: int = 1, stats: bool = False, draft: str | Path | None = None, draft_tokens: int = 4) -> Any:
    """Greedy generation with the KV cache on ONNX Runtime (CPU) from a directory ``export_decoder`` wrote.

    With ``draft`` (another decoder artifact of the same vocabulary, typically the same model with blocks
    dropped: ``drop_layers``), decoding is self-speculative: the draft proposes ``draft_tokens`` tokens one at a
    time, the full model scores them all in one step, and the longest prefix it agrees with is kept plus the
    full model's own next token (Leviathan et al. 2023; layer-skipping drafts: Draft&Verify, Zhang et al. 2024;
    SWIFT, Xia et al. 2025). The tokens are the full model's greedy tokens; only the speed differs.

    Args:
        out_dir: holds ``decoder.onnx`` and ``decoder.json``.
        input_ids: prompt token ids, ``[seq]`` or ``[batch, seq]`` (equal-length prompts, no padding).
        max_new_tokens: tokens to generate per prompt.
        eos_token_id: stop once every sequence has produced it (later tokens are this id).
        threads: ONNX Runtime intra-op threads.
        stats: also return ``{"prefill_ms", "decode_ms_per_token", "decode_tokens_per_s", "tokens_per_s",
            "kv_bytes_per_token", ...}`` (``tokens_per_s``: new tokens over the time in ONNX Runtime sessions,
            prefill included; with a draft: ``acceptance_rate``, ``tokens_per_step``, ``tokens_per_s``).
        draft: a draft decoder's directory (self-speculative decoding; prompts are decoded one at a time).
        draft_tokens: tokens the draft proposes per verification step.

    Returns:
        int64 array ``[batch, seq + max_new_tokens]`` (prompt then generated tokens), and the stats if asked.
    """
    full = _Decoder(out_dir, threads)
    ids = _check_prompt(full.meta, input_ids, max_new_tokens)
    if draft is not None:
        return _speculative(full, _Decoder(draft, threads), ids, max_new_tokens, draft_tokens, eos_token_id, stats)
    batch = ids.shape[0]
    past = full.empty(batch)
    tokens, generated = ids, [ids]
    done = np.zeros(batch, dtype=bool)
    step_times = []
    for k in range(max_new_tokens):
        start = time.perf_counter()
        logits, past = full.step(tokens, past)
        step_times.append(time.perf_counter() - start)
        nxt = logits[:, -1].argmax(-1).astype(np.int64)
        if eos_token_id is not None:
            nxt = np.where(done, eos_token_id, nxt)
            done |= nxt == eos_token_id
        tokens = nxt[:, None]
        generated.append(tokens)
        if eos_token_id is not None and done.all():
            fill = max_new_tokens - k - 1
            generated.append(np.full((batch, fill), eos_token_id, dtype=np.int64))
            break
    result = np.concatenate(generated, axis=1)
    if not stats:
        return result
    decode = step_times[1:]
    summary = {"prefill_ms": step_times[0] * 1e3, "prompt_tokens": int(ids.shape[1]), "batch": batch,
               "new_tokens": len(step_times), "threads": threads,
               "decode_ms_per_token": float(np.median(decode)) * 1e3 if decode else None,
               "decode_tokens_per_s": batch / float(np.median(decode)) if decode else None,
               "seconds": float(sum(step_times)), "tokens_per_s": batch * len(step_times) / float(sum(step_times)),
               "kv_bytes_per_token": full.meta["kv_bytes_per_token"]}
    return result, summary


def _cached_length(past: dict[str, np.ndarray]) -> int:
    """Tokens held in a cache (``[batch, kv_heads, seq, head_dim]`` arrays)."""
    return next(iter(past.values())).shape[2] if past else 0


def _truncate(past: dict[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
    return {name: value[:, :, :length] for name, value in past.items()}


def _speculative(full: _Decoder, draft: _Decoder, ids: np.ndarray, max_new_tokens: int, draft_tokens: int,
                 eos_token_id: int | None, stats: bool) -> Any:
    """Draft ``draft_tokens`` tokens, verify them in one full-model step, keep the agreed prefix and the full
    model's next token; caches are cut back to the kept tokens. One prompt at a time."""
    if draft_tokens < 1:
        raise ConfigError(f"draft_tokens must be at least 1, got {draft_tokens}")
    if draft.meta["vocab_size"] != full.meta["vocab_size"]:
        raise ConfigError(f"the draft decoder's vocabulary ({draft.meta['vocab_size']}) differs from the model's "
                          f"({full.meta['vocab_size']}); draft with the same model, blocks dropped")
    rows, drafted, accepted, steps = [], 0, 0, 0
    start = time.perf_counter()
    for prompt in ids:
        sequence = list(prompt)
        target = len(sequence) + max_new_tokens
        full_past, draft_past = full.empty(1), draft.empty(1)
        # The full model caches every token but the last (which it reads next step); so does the draft.
        logits, full_past = full.step(np.asarray([sequence], dtype=np.int64), full_past)
        sequence.append(int(logits[0, -1].argmax()))
        full_past = _truncate(full_past, len(sequence) - 1)
        while len(sequence) < target and not (eos_token_id is not None and sequence[-1] == eos_token_id):
            budget = min(draft_tokens, target - len(sequence))
            pending = sequence[_cached_length(draft_past):]
            proposal: list[int] = []
            drafted_through = len(sequence) + budget - 1  # the draft caches the sequence and all but its last proposal
            for _ in range(budget):
                logits, draft_past = draft.step(np.asarray([pending], dtype=np.int64), draft_past)
                proposal.append(int(logits[0, -1].argmax()))
                pending = proposal[-1:]
            logits, full_past = full.step(np.asarray([[sequence[-1], *proposal]], dtype=np.int64), full_past)
            choice = logits[0].argmax(-1)
            agree = 0
            while agree < budget and proposal[agree] == int(choice[agree]):
                agree += 1
            drafted, accepted, steps = drafted + budget, accepted + agree, steps + 1
            kept = proposal[:agree] + [int(choice[agree])]
            if eos_token_id is not None and eos_token_id in kept:
                kept = kept[:kept.index(eos_token_id) + 1]
            sequence.extend(kept)
            full_past = _truncate(full_past, len(sequence) - 1)
            draft_past = _truncate(draft_past, min(len(sequence) - 1, drafted_through))
        if len(sequence) < target:  # stopped at eos
            sequence.extend([eos_token_id] * (target - len(sequence)))
        rows.append(sequence[:target])
    seconds = time.perf_counter() - start
    result = np.asarray(rows, dtype=np.int64)
    if not stats:
        return result
    new = len(ids) * max_new_tokens
    return result, {"acceptance_rate": accepted / drafted if drafted else None, "draft_tokens": draft_tokens,
                    "verify_steps": steps, "tokens_per_step": (new - len(ids)) / steps if steps else None,
                    "tokens_per_s": new / seconds, "seconds": seconds, "batch": len(ids),
                    "new_tokens": max_new_tokens, "threads": full.threads}


def measure_generation(out_dir: str | Path, *, prompt_tokens: int = 16, new_tokens: int = 32, runs: int = 3,
                       threads: int = 1) -> dict[str, Any]:
    """Median ``prefill_ms`` and ``decode_tokens_per_s`` of ``runs`` greedy generations at batch 1 (random prompt),
    with ``kv_bytes_per_token``."""
    meta, _ = _load(out_dir)
    prompt = np.random.default_rng(0).integers(0, max(meta["vocab_size"], 2), (1, prompt_tokens))
    stats = [generate(out_dir, prompt, new_tokens, threads=threads, stats=True)[1] for _ in range(runs)]
    return {"prefill_ms": float(np.median([s["prefill_ms"] for s in stats])),
            "decode_tokens_per_s": float(np.median([s["decode_tokens_per_s"] for s in stats])),
            "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "runs": runs, "threads": threads,
            "kv_bytes_per_token": meta["kv_bytes_per_token"]}


def greedy_reference(gm: GraphModule, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding by re-running the captured model on the whole sequence each step (no cache): what the
    cached decoder must reproduce token for token."""
    ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    for _ in range(max_new_tokens):
        nxt = _full_logits(gm, ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids
