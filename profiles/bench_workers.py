"""One LLM runtime per process, driven by profiles/bench_llm.py over stdin/stdout (JSON lines).

Run as a script (`python bench_workers.py SYSTEM CONFIG_JSON`) so that a peer can live in another virtual
environment (llama-cpp-python builds from source into its own): this file imports only the standard library and
numpy at the top, and each system its own package when it starts. One process per system also makes the peak RSS
of each runtime its own.

Systems: edgeprune (our decoder on ONNX Runtime through runtime/llm.py), genai (ONNX Runtime GenAI), llamacpp
(llama-cpp-python), torch (transformers eager/sdpa). Commands, one JSON object per line:
    {"cmd": "prefill", "ids": [...]}                 -> {"s": seconds}
    {"cmd": "decode", "ids": [...], "steps": n}      -> {"s": [seconds per token]}   (prefill of ids not timed)
    {"cmd": "generate", "ids": [...], "new": n}      -> {"s": seconds for prefill + n greedy tokens}
    {"cmd": "rss"}                                   -> {"peak_rss": bytes over the process's life}
    {"cmd": "quit"}
Every timed decode step includes picking the greedy token, as generation does.
"""
from __future__ import annotations

import json
import resource
import sys
import time

import numpy as np


class Edgeprune:
    def __init__(self, cfg: dict):
        from edgeprune.runtime.llm import OrtLLM, llm_manifest

        self.llm = OrtLLM(cfg["path"], llm_manifest(cfg["path"]), providers=["cpu"], threads=cfg["threads"])

    def _start(self, ids: list[int], extra: int):
        cache = self.llm.new_cache(1, len(ids) + extra + 1)
        logits = self.llm.forward(self.llm.embed(np.array([ids])), np.arange(len(ids))[None], cache)
        return cache, logits

    def prefill(self, ids):
        self._start(ids, 0)

    def decode(self, ids, steps):
        cache, logits = self._start(ids, steps)
        times = []
        for t in range(steps):
            start = time.perf_counter()
            token = logits[0].argmax()
            logits = self.llm.forward(self.llm.embed(np.array([[token]])), np.array([[len(ids) + t]]), cache)
            times.append(time.perf_counter() - start)
        return times

    def generate(self, ids, new):
        self.llm.generate(self.llm.embed(np.array([ids])), np.arange(len(ids))[None], max_new_tokens=new,
                          eos_token_ids=None)


class Genai:
    def __init__(self, cfg: dict):
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(cfg["path"])
        config.clear_providers()   # CPU
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": cfg["threads"], "inter_op_num_threads": 1}}}}))
        self.model = og.Model(config)

    def _generator(self, length: int):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=length, do_sample=False)
        return self.og.Generator(self.model, params)

    def prefill(self, ids):
        self._generator(len(ids) + 1).append_tokens(ids)

    def decode(self, ids, steps):
        gen = self._generator(len(ids) + steps + 1)
        gen.append_tokens(ids)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            gen.generate_next_token()
            times.append(time.perf_counter() - start)
        return times

    def generate(self, ids, new):
        gen = self._generator(len(ids) + new)
        gen.append_tokens(ids)
        for _ in range(new - 1):   # the prefill produced the first token
            gen.generate_next_token()


class Llamacpp:
    def __init__(self, cfg: dict):
        from llama_cpp import Llama

        self.llm = Llama(model_path=cfg["path"], n_ctx=cfg.get("context", 1024), n_batch=1024, n_ubatch=1024,
                         n_threads=cfg["threads"], n_threads_batch=cfg["threads"], logits_all=False, verbose=False)

    def _start(self, ids):
        self.llm.reset()
        self.llm.eval(ids)

    def _next(self):
        return int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))

    def prefill(self, ids):
        self._start(ids)

    def decode(self, ids, steps):
        self._start(ids)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            self.llm.eval([self._next()])
            times.append(time.perf_counter() - start)
        return times

    def generate(self, ids, new):
        self._start(ids)
        for _ in range(new - 1):
            self.llm.eval([self._next()])


class Torch:
    def __init__(self, cfg: dict):
        import torch

        from edgeprune.profiles.bench_llm import load_llm

        torch.set_num_threads(cfg["threads"])
        self.torch, self.llm = torch, load_llm(real=True, layers=None)

    def _start(self, ids):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.llm.config)
        out = self.llm(input_ids=self.torch.tensor([ids]), cache=cache, use_cache=True, logits_to_keep=1)
        return cache, out.logits[0, -1]

    def prefill(self, ids):
        with self.torch.no_grad():
            self._start(ids)

    def decode(self, ids, steps):
        times = []
        with self.torch.no_grad():
            cache, logits = self._start(ids)
            for _ in range(steps):
                start = time.perf_counter()
                out = self.llm(input_ids=logits.argmax().reshape(1, 1), cache=cache, use_cache=True)
                logits = out.logits[0, -1]
                times.append(time.perf_counter() - start)
        return times

    def generate(self, ids, new):
        with self.torch.no_grad():
            cache, logits = self._start(ids)
            for _ in range(new - 1):
                logits = self.llm(input_ids=logits.argmax().reshape(1, 1), cache=cache,
                                  use_cache=True).logits[0, -1]


SYSTEMS = {"edgeprune": Edgeprune, "genai": Genai, "llamacpp": Llamacpp, "torch": Torch}


def serve(system, stdin=sys.stdin, stdout=sys.stdout) -> None:
    for line in stdin:
        msg = json.loads(line)
        cmd = msg["cmd"]
        if cmd == "quit":
            break
        if cmd == "rss":
            reply = {"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        elif cmd == "decode":
            reply = {"s": system.decode(msg["ids"], msg["steps"])}
        else:
            start = time.perf_counter()
            if cmd == "prefill":
                system.prefill(msg["ids"])
            elif cmd == "generate":
                system.generate(msg["ids"], msg["new"])
            else:
                raise ValueError(f"unknown command {cmd!r}")
            reply = {"s": time.perf_counter() - start}
        stdout.write(json.dumps(reply) + "\n")
        stdout.flush()


if __name__ == "__main__":
    name, config = sys.argv[1], json.loads(sys.argv[2])
    ready = SYSTEMS[name](config)
    sys.stdout.write(json.dumps({"ready": name}) + "\n")
    sys.stdout.flush()
    serve(ready)
