"""`tandem bench`: measure Tandem, next to transformers and to the memory-bandwidth floor.

Modes (each prints a table, writes a JSON file of every figure, and for sweeps a PNG plot):

    offline   the engine in this process, every request submitted at once; requests/s and
              output / total tokens/s (engine/bench/offline.py)
    latency   decode milliseconds per step at batch sizes 1..64 and one context length, next to
              the roofline: bytes a decode step must read over the copy bandwidth measured in
              the same run (engine/bench/latency.py)
    serve     Poisson arrivals against a running gateway (public gRPC API, or OpenAI HTTP);
              TTFT, TPOT, ITL, E2EL percentiles and goodput as vLLM's `bench serve` defines them
              (engine/bench/serve.py)

`--compare-transformers` (offline, latency) runs transformers `generate()` on the same weight
tensors, prompts and device in the same process and reports Tandem / transformers.

Workloads live in engine/bench/datasets.py; tables, JSON, plots and progress in
engine/bench/report.py. engine/bench/models/ holds configs (no weights) for `--load-format dummy`.
"""
