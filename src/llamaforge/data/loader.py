"""Training windows from a memory-mapped token file.

The train stream is cut into non-overlapping windows of seq_len + 1 tokens (inputs and shifted
targets share the boundary token). Windows are visited in a per-epoch permutation drawn from
(seed, epoch), each exactly once per epoch. A global counter orders all windows of all epochs;
step s takes `seqs_per_step` consecutive entries of that order and rank r its r-th slice of them,
so ranks never overlap or leave gaps, and the counter alone is the loader's state: a resumed run
continues with exactly the next batch. The file is a read-only memmap, so processes share pages.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..config import micro_batch_for
from ..errors import UserError
from .prepare import open_split, read_meta


class EpochOrder:
    """A global order over `n` items: epoch e visits them in a permutation drawn from (seed, e)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, None

    def ids(self, first: int, count: int) -> np.ndarray:
        """Items at global positions first .. first + count - 1 (crossing epochs as needed)."""
        out = np.empty(count, dtype=np.int64)
        for i, g in enumerate(range(first, first + count)):
            epoch, pos = divmod(g, self.n)
            if epoch != self._epoch:
                self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
            out[i] = self._perm[pos]
        return out


class TokenWindows:
    bytes_per_token: float | None = None  # PretrainBatches knows it from meta.json

    def __init__(self, tokens: np.ndarray, seq_len: int, seqs_per_step: int, rank: int = 0, world: int = 1,
                 seed: int = 0):
        if seqs_per_step % world:
            raise UserError(f"{seqs_per_step} sequences per step do not split over {world} ranks; "
                            "make batch_tokens / seq_len a multiple of the number of processes")
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.seqs_per_step, self.rank, self.local = seqs_per_step, rank, seqs_per_step // world
        self.n_windows = (len(tokens) - 1) // seq_len
        if self.n_windows < seqs_per_step:
            raise UserError(f"the train split has {len(tokens):,} tokens, fewer than one step "
                            f"({seqs_per_step} x {seq_len + 1}); use more data or a smaller batch_tokens")
        self.consumed = 0  # windows taken by all ranks so far
        self.order = EpochOrder(self.n_windows, seed)

    def window_ids(self, first: int, count: int) -> np.ndarray:
        return self.order.ids(first, count)

    @property
    def epoch(self) -> float:
        return self.consumed / self.n_windows

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (inputs, targets) for the next step, each (seqs_per_step / world, seq_len)."""
        ids = self.window_ids(self.consumed + self.rank * self.local, self.local)
        self.consumed += self.seqs_per_step
        T = self.seq_len
        return to_pair(np.stack([self.tokens[i * T : i * T + T + 1] for i in ids]))

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "seed": self.seed, "seq_len": self.seq_len, "n_windows": self.n_windows,
                "seqs_per_step": self.seqs_per_step}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "seq_len", "n_windows", "seqs_per_step"):
            if state[key] != mine[key]:
                raise UserError(f"checkpoint was made with loader {key}={state[key]}, now {mine[key]}; "
                                "resume with the same data and batch settings or start a new run")
        self.consumed = int(state["consumed"])


def to_pair(windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, T + 1) token windows -> (inputs, next-token targets), each (b, T) int64: the one batch
    shape every loader yields (SFT's targets also carry -100 where no loss is taken)."""
    t = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.int64))
    return t[:, :-1], t[:, 1:]


def eval_windows(tokens: np.ndarray, seq_len: int, max_tokens: int, batch: int):
    """(inputs, targets) of consecutive windows from the start of `tokens`, up to `max_tokens` targets."""
    n = min((len(tokens) - 1) // seq_len, max(1, max_tokens // seq_len))
    for s in range(0, n, batch):
        ids = range(s, min(n, s + batch))
        yield to_pair(np.stack([tokens[i * seq_len : i * seq_len + seq_len + 1] for i in ids]))


class PretrainBatches(TokenWindows):
    """TokenWindows over DATA_DIR/train.bin, plus validation windows from val.bin."""

    def __init__(self, data_dir, train_cfg, rank: int = 0, world: int = 1):
        meta = read_meta(data_dir)
        super().__init__(open_split(data_dir, "train"), train_cfg.seq_len, train_cfg.batch_tokens // train_cfg.seq_len,
                         rank, world, train_cfg.seed)
        self.val = open_split(data_dir, "val")
        if len(self.val) <= train_cfg.seq_len:
            self.val = self.tokens[-train_cfg.eval_tokens - 1 :]  # tiny corpora: the tail of train
        val = meta.splits["val"]
        self.bytes_per_token = val.bytes / val.tokens if val.tokens else None
        self.eval_tokens, self.eval_batch = train_cfg.eval_tokens, micro_batch_for(train_cfg, world)

    def eval_batches(self):
        return eval_windows(self.val, self.seq_len, self.eval_tokens, self.eval_batch)


class Prefetched:
    """Any loader, with the next step's batch read in a background thread while this step trains
    (and, for CUDA, copied into pinned memory there, contiguous, so the host-to-device copy is
    asynchronous). `state_dict` is the state after the last batch handed out, not after the one
    being read ahead, so a checkpoint resumes with exactly the next batch."""

    def __init__(self, inner, pin: bool = False):
        self.inner, self.pin = inner, pin
        self.bytes_per_token = inner.bytes_per_token
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="llamaforge-prefetch")
        self._ahead = None
        self._state = inner.state_dict()

    def _read(self):
        x, y = self.inner.next_batch()
        if self.pin:
            x, y = x.contiguous().pin_memory(), y.contiguous().pin_memory()
        return (x, y), self.inner.state_dict()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch, self._state = (self._ahead or self._pool.submit(self._read)).result()
        self._ahead = self._pool.submit(self._read)
        return batch

    def state_dict(self) -> dict:
        return self._state

    def load_state_dict(self, state: dict) -> None:
        self._drain()
        self.inner.load_state_dict(state)
        self._state = self.inner.state_dict()

    def eval_batches(self):
        return self.inner.eval_batches()

    def _drain(self) -> None:
        if self._ahead is not None:
            try:
                self._ahead.result()  # a read-ahead's error belongs to a step that never came
            except Exception:  # noqa: BLE001
                pass
            self._ahead = None

    def close(self) -> None:
        self._drain()
        self._pool.shutdown(wait=True)
