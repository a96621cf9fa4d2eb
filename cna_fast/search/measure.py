"""What a circuit search measures and what it costs: KL on neutral text for many settings as rows of
the same forwards (`NeutralKL`), and a clock that turns tokens into seconds (`SearchClock`): one
estimate for the whole search, a time budget, and what the full grid would have cost."""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence

import torch

from ..circuit import Circuit
from ..evaluation.metrics import next_token_logprobs, next_token_mask, token_kl
from ..steering import steer


class NeutralKL:
    """Mean next-token KL(unsteered || steered) on neutral texts, for any number of settings as batch rows.

    The unsteered log-probabilities are computed once per chunk of texts and kept while they fit in
    `cache_bytes`, so measuring settings one at a time, or on the first texts and later on all of
    them, costs only the steered forwards. The mean is over every real next-token position of the
    texts used, as in `evaluation.capability_metrics`. max_logits bounds the logits held at once
    (rows x tokens x vocabulary); chunk_texts bounds the texts of a chunk, the step by which `measure`
    can use the first texts only.
    """

    def __init__(self, model, tokenizer, texts: Sequence[str], *, max_logits: int = 1 << 25,
                 cache_bytes: int = 1 << 30, chunk_texts: int | None = None) -> None:
        encoded = tokenizer(list(texts), return_tensors="pt", padding=True)
        self.model, self.ids, self.attention = model, encoded.input_ids, encoded.attention_mask
        self.mask = next_token_mask(self.attention)
        vocab = model.get_output_embeddings().weight.shape[0]
        self.rows = max(1, max_logits // (self.ids.shape[1] * vocab))
        step = min(self.rows, chunk_texts or self.rows)
        self.chunks = [list(range(first, min(first + step, len(texts)))) for first in range(0, len(texts), step)]
        self.cache_bytes = cache_bytes
        self._reference: dict[int, torch.Tensor] = {}

    @property
    def texts(self) -> int:
        return self.ids.shape[0]

    def tokens(self, texts: int | None = None) -> int:
        """Input tokens of one forward over the first `texts` texts (all when None): the cost of one setting."""
        used = [index for chunk in self.chunks[:self.chunk_count(texts)] for index in chunk]
        return int(self.attention[used].sum())

    def chunk_count(self, texts: int | None) -> int:
        """How many chunks cover at least the first `texts` texts."""
        if texts is None:
            return len(self.chunks)
        covered = 0
        for count, chunk in enumerate(self.chunks, start=1):
            covered += len(chunk)
            if covered >= texts:
                return count
        return len(self.chunks)

    def texts_used(self, texts: int | None) -> int:
        return sum(len(chunk) for chunk in self.chunks[:self.chunk_count(texts)])

    def reference(self, chunk: int) -> torch.Tensor:
        """The unsteered log-probabilities of one chunk of texts (kept when they fit in the cache)."""
        if chunk in self._reference:
            return self._reference[chunk]
        rows = self.chunks[chunk]
        logprobs = next_token_logprobs(self.model, self.ids[rows], self.attention[rows])
        held = sum(tensor.numel() * tensor.element_size() for tensor in self._reference.values())
        if held + logprobs.numel() * logprobs.element_size() <= self.cache_bytes:
            self._reference[chunk] = logprobs
        return logprobs

    def measure(self, shells: Sequence[Circuit], table: torch.Tensor, texts: int | None = None,
                progress: bool = False) -> torch.Tensor:
        """Mean KL per row of `table` [settings, shells] (float64), on the first `texts` texts (rounded up
        to whole chunks; all when None)."""
        from tqdm.auto import tqdm

        chunks = self.chunks[:self.chunk_count(texts)]
        if not shells:
            return torch.zeros(table.shape[0], dtype=torch.float64)
        totals = torch.zeros(table.shape[0], dtype=torch.float64)
        with tqdm(total=table.shape[0] * sum(map(len, chunks)), desc="KL", unit="row", disable=not progress) as bar:
            for number, rows_here in enumerate(chunks):
                reference = self.reference(number)
                pairs = [(setting, text) for setting in range(table.shape[0]) for text in range(len(rows_here))]
                for start in range(0, len(pairs), self.rows):
                    settings = [setting for setting, _ in pairs[start:start + self.rows]]
                    local = [text for _, text in pairs[start:start + self.rows]]
                    chosen = [rows_here[text] for text in local]
                    with steer(self.model, list(shells), multipliers=table[settings]):
                        steered = next_token_logprobs(self.model, self.ids[chosen], self.attention[chosen])
                    kl = token_kl(reference[local], steered) * self.mask[chosen]
                    totals.index_add_(0, torch.tensor(settings), kl.sum(-1).double())
                    bar.update(len(settings))
        used = [index for chunk in chunks for index in chunk]
        return (totals / self.mask[used].sum()).clamp_min(0.0)


def batched_kl(model, tokenizer, shells: Sequence[Circuit], table: torch.Tensor, texts: Sequence[str], *,
               max_logits: int = 1 << 25, progress: bool = False) -> torch.Tensor:
    """Mean next-token KL(unsteered || steered) on `texts` for every row of `table` [settings, shells].

    The texts are repeated once per setting and run as rows of the same forwards, each row
    steered by its own multipliers (see `NeutralKL`).
    """
    return NeutralKL(model, tokenizer, texts, max_logits=max_logits, cache_bytes=0).measure(shells, table,
                                                                                            progress=progress)


class SearchClock:
    """Seconds spent and left in a search, from token counts and the rates measured so far.

    Two kinds of work: "forward" (KL passes, per input token) and "generate" (per generated row,
    prompt plus new tokens). Each rate starts from the first measurement of its kind (generation
    from the forward rate until it has one). `minutes` is the time budget (None: no limit); the
    progress bar shows elapsed seconds against the current estimate of the whole search.
    """

    GENERATE_OVER_FORWARD = 1.5  # a generated token costs about this many forward tokens until measured

    def __init__(self, minutes: float | None = None, progress: bool = False) -> None:
        from tqdm.auto import tqdm

        self.started = time.perf_counter()
        self.limit = None if minutes is None else 60.0 * minutes
        self.spent = {"forward": [0.0, 0], "generate": [0.0, 0]}  # seconds, tokens
        self.stage = (0.0, 0.0)  # when the estimate was last shown, and the seconds it then left
        self.bar = tqdm(total=1, desc="search (elapsed / estimated s)", unit="s", disable=not progress,
                        bar_format="{desc}: {n:.0f}/{total:.0f} s |{bar}| {percentage:3.0f}%")

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        """Seconds left of the time budget (infinite without one)."""
        return math.inf if self.limit is None else self.limit - self.elapsed()

    def rate(self, kind: str) -> float:
        """Seconds per token of this kind of work, as measured so far (a guess before any measurement)."""
        seconds, tokens = self.spent[kind]
        if tokens:
            return seconds / tokens
        forward_seconds, forward_tokens = self.spent["forward"]
        forward = forward_seconds / forward_tokens if forward_tokens else 1e-3
        return forward * (self.GENERATE_OVER_FORWARD if kind == "generate" else 1.0)

    def cost(self, kind: str, tokens: float) -> float:
        return self.rate(kind) * tokens

    @contextlib.contextmanager
    def timing(self, kind: str, tokens: int) -> Iterator[None]:
        """Time a piece of work of `tokens` tokens of `kind`, to calibrate its rate."""
        started = time.perf_counter()
        yield
        self.spent[kind][0] += time.perf_counter() - started
        self.spent[kind][1] += tokens

    def show(self, remaining: float) -> None:
        """Refresh the bar: elapsed seconds against elapsed plus the `remaining` estimate."""
        elapsed = self.elapsed()
        if self.limit is not None:  # the stages are cut to fit the budget, so the search ends by then
            remaining = min(remaining, max(0.0, self.limit - elapsed))
        self.stage = (elapsed, remaining)
        self.bar.total = max(1.0, elapsed + remaining)
        self.bar.n = elapsed
        self.bar.refresh()

    @contextlib.contextmanager
    def ticking(self) -> Iterator[None]:
        """Wrap one batch of a long stage: afterwards the bar moves, the estimate counted down from the
        last `show` (never below zero)."""
        yield
        shown_at, remaining = self.stage
        elapsed = self.elapsed()
        self.bar.total = max(self.bar.total, elapsed + 1.0, shown_at + remaining)
        self.bar.n = elapsed
        self.bar.refresh()

    def close(self) -> None:
        self.show(0.0)
        self.bar.close()
