"""A served model + a p99 budget -> the serving settings that give the most images/s on this host.

    vitserve tune --model vitb32 --p99-ms 400 --max-minutes 10

What is swept, for the model's CPU backbone (vitserve's python-backend onnxruntime model) and its ensemble:
which backbone variant the ensemble routes to (every CPU precision the repository publishes: fp32, int8,
bf16, cpu-int8 where asked for; each runs the engine its flavours pick on this host), the engine each
variant serves on (its `flavour` pinned: e.g. fp32 on OpenVINO or onnxruntime; the flavours this host's
order tries that pass their probe here, scored in-process first), instance count x
onnxruntime intra-op threads (instances x threads <= the usable cores, and two instances of every core each
with spinning off), lanes (a batch cut into 1-thread slices run at once),
onnxruntime spinning (`session.intra_op.allow_spinning`), dynamic batching (max queue delay, preferred batch
sizes) and the python preprocess model's instances and threads. Models that are not vitserve CPU backbones
(the tiny test model) get the knobs that apply to them: instances and dynamic batching.

How each configuration is served: the real tritonserver with `--model-control-mode=explicit` (started here
on `--repository`, or the one at `--url`, which must run in that mode), each model reloaded through
Triton's load API with a config override (`load_model(name, config=JSON)`): the repository's files are
never touched, and the served config is read back and checked before a point is measured. Each point is
the real perf_analyzer (`vitserve.perf.perf_analyzer`) with Triton's statistics around it (queue, compute
input/infer/output per model, average batch: `vitserve.perf.server_stats`).

How the space is searched, in stages (a full grid is days on a 2-core host), after the configuration the
server had is measured as it is (stage `untuned`: the report's untuned / tuned): `compute` (variant x
instances/threads x lanes x spinning, batching as configured), then `engine` (each variant with the best
compute settings on its other engines), then `batching` (queue delay x preferred sizes around the best so
far), then `preprocess` (instances x threads; ensemble only), then `refine` (the compute knobs again under
the engine, batching and preprocess chosen, and the other variants). The workload is every
(concurrency, images per request) pair; a point is one configuration at one pair. The Pareto front is taken
per pair (throughput up, p99 down); the choice is the configuration with the best geometric mean of its
throughput over the best seen at each pair, p99 within the budget at every pair (`choose`). Bounded: no
configuration starts after the deadline. Resumable: every point is appended to `measurements.jsonl` in the
output folder with the settings it was measured under, and a rerun skips what is there. With a
models.yaml, the choice is written back as the model's `tuned:` section (see `vitserve.exporter.config.Tuned`),
which `make engines` writes into config.pbtxt.

One module per job: search.py (points -> the next configurations and the choice; no server), configs.py
(the served configs read, rewritten through the served-model contract, reloaded and checked), measurer.py
(a configuration -> its points, through `vitserve.perf.measure` as `vitserve perf` measures; the resumable
store), check.py (served vs in-process), writeback.py (models.yaml `tuned:`), report.py (report.md,
tune.json, front.png), run.py (the whole run) and cli.py (`vitserve tune`).
"""

from vitserve.perf.tune.cli import add_command
from vitserve.perf.tune.run import run_tune

__all__ = ["add_command", "run_tune"]
