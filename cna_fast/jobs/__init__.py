"""Batch jobs: many prompts generated into a results file, streaming and resumable.

continuous: continuous batching on the model's own forward, steered per row; job: the resumable
job (`generate_to_file`, `cna generate --out`); output: its JSONL results file and settings sidecar;
server: the same job with the generation done by llama-server or vLLM (`cna generate --server`).
"""
from .continuous import Completion, ContinuousBatcher, Request, choose_tokens
from .job import JobRecord, JobSummary, generate_to_file, record_seed
from .output import JobOutput, sidecar_path
from .server import LlamaServer, generate_on_server, llama_server_binary, load_tokenizer

__all__ = ["Completion", "ContinuousBatcher", "JobOutput", "JobRecord", "JobSummary", "LlamaServer", "Request",
           "choose_tokens", "generate_on_server", "generate_to_file", "llama_server_binary", "load_tokenizer",
           "record_seed", "sidecar_path"]
