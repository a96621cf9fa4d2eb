"""Batch jobs: many prompts generated into a results file, streaming and resumable.

continuous: continuous batching on the model's own forward, steered per row; job: the resumable
job (`generate_to_file`, `cna generate --out`); output: its JSONL results file and settings sidecar.
"""
from .continuous import Completion, ContinuousBatcher, Request, choose_tokens
from .job import JobRecord, JobSummary, generate_to_file, record_seed
from .output import JobOutput, sidecar_path

__all__ = ["Completion", "ContinuousBatcher", "JobOutput", "JobRecord", "JobSummary", "Request", "choose_tokens",
           "generate_to_file", "record_seed", "sidecar_path"]
