"""Every GPU check of the QLoRA path in one run, with a short table printed last.

    python -m benchmarks.gpu_check [--tiny] [--anchor PATH | --no-anchor] [--steps N] [--budget-s S]
                                   [--only SECTIONS]

Everything is done through the library's public APIs, the ones the pipeline runs: `architectures.FAMILIES`
for the models, the `report` preset (`config.parse_config`) for the settings, and the training stage itself
(`training.train_stage(TrainJob)`), which loads the base in 4-bit, plans memory, caps the process to the
preset's `gpu_memory_gib`, halves the plan after an out-of-memory error and returns a `TrainResult`.

Sections (each in a process of its own, so GPU memory peaks never mix and one failure leaves the rest standing):

1. `llama`, `bloom`, `falcon` (one per entry of `architectures.FAMILIES`): the family's reference
   architecture (`Family.real_config()`: open_llama_3b, bloom-3b, falcon-rw-1b) with random bf16 weights built
   on the GPU and saved with a small tokenizer (`tiny.build_tokenizer`); loaded in 4-bit with
   `modeling.load_model` and checked with `modeling.quantization_report` (share 1.0); then trained through
   `train_stage` with the preset's settings for that model (batch 4 / 2 / 1 rows, max_length 512, LoRA r16
   all-linear, paged AdamW 8-bit, bf16, 8 GiB cap) for `--steps` steps on rows of random token ids with
   Alpaca's lengths (log-normal, median ~150, clipped to 40-512). The stage's peak must stay <= 7.5 GiB.
2. `anchor`: `anchor_bench.py` in a subprocess, stopped once it has printed its "report's setup" row.
3. `throughput`: the llama-3b architecture on the whole card (`gpu_memory_gib: None`), a few settings
   expressed through the pipeline's own config (batch size, `gradient_checkpointing`, `tokens_per_micro_batch`,
   `group_by_length`), each trained through `train_stage`; real tokens/s against the anchor's row.

`--tiny` (the default without CUDA): the same sections with each family's tiny config on the CPU, 3 steps.
Results: `$OUT/gpu_check.json` (else `./gpu_check_out/`), `gpu_check.log`, `anchor_results.jsonl`. Exit
status 0 when every section ran, every model is fully 4-bit and every report-preset peak is within the limit;
the throughput goal is reported, not enforced. Never imports prefect or mlflow.

Modules: `cli` (options, the run, its outputs), `runner` (a section in a process of its own), `sections` (what
runs in that process), `models` (architectures, tokenizer, synthetic data), `anchor`, `table` (checks, table).
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PEAK_LIMIT_GIB = 7.5  # the report's 8 GiB card, less what the CUDA context and allocator keep
RATIO_GOAL, RATIO_STRETCH = 4.0, 8.0  # best throughput setting against the anchor's report row
