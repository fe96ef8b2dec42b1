"""The model behind the server: a batch of Triton requests -> one Pipeline.generate_rows call -> a response each.

Used by the PyTriton server (serve/server.py) and by the model.py of a stock Triton repository (serve/repo.py),
so both answer identically. numpy + the torch-free runtime only.

Each request is checked on its own first (serve/protocol.py): a corrupt image, an over-long prompt or a bad
parameter fails that request only. The valid greedy requests then run as one batch (rows of different prompt
lengths, runtime/pipeline.py); a sampled request runs alone, so its seeded draws do not depend on its neighbours.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from edgeprune.errors import BundleError, EdgepruneError
from edgeprune.serve.protocol import STAGES_MS, Limits, Request, RequestError, error_outputs, parse_request

__all__ = ["Engine"]

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, bundle: str | Path, limits: Limits = Limits(), threads: int | None = None,
                 providers: list[str] | None = None):
        from edgeprune.runtime.pipeline import Pipeline

        self.pipeline = Pipeline(bundle, providers=providers, threads=threads)
        fixed = self.pipeline.vision.batch
        if fixed is not None:
            raise BundleError(f"{bundle}: its vision graph takes exactly {fixed} image(s) (exported with --batch "
                              f"{fixed}); serving batches requests: export it without --batch")
        self.limits = limits
        self.keep = self.pipeline.keep

    def count_tokens(self, prompt: str) -> int:
        return len(self.pipeline.tokenizer.encode(prompt, add_special_tokens=False).ids)

    def infer(self, requests: list[dict]) -> list[dict]:
        """requests: name -> array (batch dim 1), as Triton delivers them -> outputs per request (protocol.OUTPUTS)."""
        responses: list[dict | None] = [None] * len(requests)
        parsed: dict[int, Request] = {}
        for i, tensors in enumerate(requests):
            try:
                parsed[i] = parse_request(tensors, self.limits, self.count_tokens)
            except RequestError as err:
                responses[i] = error_outputs(str(err), self.keep)
        groups: dict[tuple, list[int]] = {}
        for i, request in parsed.items():
            groups.setdefault(request.sampling, []).append(i)
        for members in groups.values():
            for i, out in zip(members, self._run([parsed[i] for i in members])):
                out["batch_size"] = np.array([[len(requests)]], dtype=np.int32)
                responses[i] = out
        return responses

    def _run(self, batch: list[Request]) -> list[dict]:
        """One generate_rows call for requests of the same sampling settings; a failure fails these requests only."""
        images = [image for request in batch for image in request.images]
        prompts = [request.prompt for request in batch for _ in request.images]
        first = batch[0]
        try:
            result = self.pipeline.generate_rows(
                images, prompts, max_new_tokens=max(r.max_new_tokens for r in batch), do_sample=not first.greedy,
                top_p=first.top_p, temperature=first.temperature or 1.0, seed=first.seed)
        except EdgepruneError as err:
            return [error_outputs(str(err), self.keep) for _ in batch]
        except Exception as err:  # an ORT or runtime failure must not take the server down: log it, fail the batch
            log.exception("batch of %d request(s) failed", len(batch))
            return [error_outputs(f"internal error: {type(err).__name__}: {err}", self.keep) for _ in batch]
        timings = np.array([[result.timings[s] * 1000 for s in STAGES_MS]], dtype=np.float32)
        eos = set(self.pipeline.bundle.eos_token_ids or [])
        outputs, row = [], 0
        for request in batch:
            rows = range(row, row + len(request.images))
            row += len(request.images)
            ids = [result.ids[r][:request.max_new_tokens] for r in rows]   # the batch ran to its longest limit
            texts = [self.pipeline.tokenizer.decode(i, skip_special_tokens=True) for i in ids]
            reasons = ["stop" if i and i[-1] in eos else "length" for i in ids]
            outputs.append({
                "text": np.array([[t.encode("utf-8") for t in texts]], dtype=object),
                "finish_reason": np.array([[r.encode() for r in reasons]], dtype=object),
                "positions": result.positions[list(rows)][None],
                "prompt_tokens": np.array([[result.prompt_lengths[r] for r in rows]], dtype=np.int32),
                "completion_tokens": np.array([[len(i) for i in ids]], dtype=np.int32),
                "timings_ms": timings,
                "error": np.array([[b""]], dtype=object),
            })
        return outputs
