"""Task streams for continual learning: the CL_Benchmark reader, custom streams, the prompt
format, seeded stratified subsampling, answer-only tokenisation and length-grouped batching."""

from migu.data.benchmark import (ENV_VAR, default_data_dir, list_tasks, load_benchmark_stream,
                                 load_benchmark_task, resolve_order)
from migu.data.collate import (IGNORE_INDEX, collate, encode, encode_prompts, length_grouped_batches, on_model_device,
                               sorted_batches, task_reserve)
from migu.data.custom import load_custom_stream
from migu.data.prompts import ANSWER_SUFFIX, build_prompt, extract_answer
from migu.data.records import DataError, Example, Task, read_records, stratified_indices, subsample, task_rng

__all__ = [
    "ANSWER_SUFFIX",
    "ENV_VAR",
    "IGNORE_INDEX",
    "DataError",
    "Example",
    "Task",
    "build_prompt",
    "collate",
    "on_model_device",
    "default_data_dir",
    "encode",
    "encode_prompts",
    "extract_answer",
    "length_grouped_batches",
    "list_tasks",
    "load_benchmark_stream",
    "load_benchmark_task",
    "load_custom_stream",
    "read_records",
    "resolve_order",
    "sorted_batches",
    "stratified_indices",
    "subsample",
    "task_reserve",
    "task_rng",
]
