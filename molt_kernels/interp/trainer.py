"""Train replacement layers (MOLTs or TopK transcoders) on several hookpoints of a model at once,
on activations made on the fly, in one process or data-parallel under ``torchrun``.

Data. Every process runs the model on its own texts (its data shards, see
:mod:`molt_kernels.interp.activations`) and keeps the rows in one bounded
:class:`ShufflingBuffer` per shard; one forward pass feeds every hookpoint. A step draws
``batch_tokens / data_shards`` rows from each shard: the global batch is the union of the shards'
micro-batches, and the loss is the mean of their micro-batch losses. Runs with the same
``data_shards`` see the same tokens in every step whatever the number of processes, so a 2-process
run equals a 1-process run with ``data_shards=2`` up to float reordering.

Parallelism (``torch.distributed``, gloo on CPU, NCCL on GPU):
  - default: every process holds every layer, wrapped in ``DistributedDataParallel``; gradients
    are all-reduced (averaged) by DDP, micro-batches beyond one per process accumulate under
    ``no_sync``.
  - ``distribute_layers``: layer i lives only on rank ``i % world``; each step the owner gathers
    (``dist.gather``) its layer's micro-batches from every rank and trains on the global batch.

Training options (``TrainerConfig``): the Frobenius-scaled tanh / L1 sparsity penalty with a
linear warm-up of its coefficient; k annealing; batch top-k; dead-unit tracking and (MOLT) gate
reopening; learning-rate warm-up then linear / cosine decay; gradient-norm clipping; bf16 on GPU;
token masks (padding always dropped, special tokens such as BOS / [CLS] dropped by the
``prepare`` function the caller passes).

Outputs under ``out_dir``: ``logs/<path>.jsonl`` (one JSON record per log / eval step),
``layers/<path>/`` (``save_pretrained``) at the end, ``checkpoints/step_<N>/`` every
``checkpoint_every`` steps: the layers, per layer the optimizer, scheduler, dead tracker and
metric sums, per data shard its buffer and position, per rank the torch RNG. ``resume`` continues
from one so that the interrupted-and-resumed run equals an uninterrupted one bit for bit (same
hardware, same process count).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from molt_kernels.interp.activations import (
    ActivationSource,
    Prepare,
    RowLayout,
    ShufflingBuffer,
    TextStream,
    collect_rows,
    forward_hookpoints,
)
from molt_kernels.interp.metrics import (
    DeadTracker,
    fired_units,
    fvu,
    jacobian_cosine,
    l0,
    module_jacobian,
    molt_jacobian,
    transcoder_jacobian,
)
from molt_kernels.interp.objective import LayerObjective, n_units, output_weights
from molt_kernels.interp.replace import get_module
from molt_kernels.interp.schedules import LR_DECAYS, annealed_k, linear_warmup, lr_factor
from molt_kernels.interp.train import PENALTY_FORMS, fit_gate_bias, init_from_data
from molt_kernels.layers.io import WEIGHTS_FILE, check_weights_header, read_config
from molt_kernels.layers.molt import MOLT

LayerFactory = Callable[[int, int, int], nn.Module]
"""(hookpoint index, d_in, d_out) -> a fresh MOLT or TopKTranscoder."""


@dataclass
class TrainerConfig:
    """Everything that decides what a run computes (``progress`` aside).

    Sizes are in tokens; ``batch_tokens`` is the global batch (all processes together).
    """

    max_tokens: int = 1_000_000
    batch_tokens: int = 4096
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_warmup_steps: int = 50
    lr_decay: str = "cosine"  # "constant" | "linear" | "cosine", down to lr * lr_min_ratio
    lr_min_ratio: float = 0.1
    grad_clip: float | None = 1.0  # max global gradient norm per layer; None: no clipping
    sparsity_coef: float = 3e-3
    sparsity_form: str = "tanh"
    sparsity_c: float = 1.0
    sparsity_warmup_steps: int | None = None  # None: a fifth of the steps
    k_start: int | None = None  # k annealing: from k_start down (or up) to the layer's k
    k_anneal_steps: int | None = None  # None: a fifth of the steps
    batch_topk: bool = False
    revive_every: int | None = 100  # MOLT gate reopening every N steps; None: never
    dead_window_tokens: int = 200_000
    init_from_data: bool = True
    init_tokens: int = 16384
    standardize_outputs: bool = True
    bf16: bool = False  # bf16 compute for the layers (CUDA only); weights and loss stay fp32
    buffer_tokens: int = 65536  # rows held per data shard
    texts_per_forward: int = 8  # texts per model call; 4 calls' texts are sorted by length
    data_shards: int | None = None  # None: one per process
    heldout_every: int = 20  # about one text in N is held out for evaluation (0: none)
    distribute_layers: bool = False
    log_every: int = 20
    eval_every: int | None = 500  # None: only at the end
    eval_tokens: int = 4096
    eval_jacobian_tokens: int = 32
    checkpoint_every: int | None = None
    keep_checkpoints: int = 2
    stop_after_steps: int | None = None  # stop (with a checkpoint) after N steps of this call
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        positive = (
            "max_tokens", "batch_tokens", "init_tokens", "buffer_tokens", "texts_per_forward",
            "log_every", "eval_tokens", "keep_checkpoints", "dead_window_tokens",
        )  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        optional_positive = (
            "data_shards", "revive_every", "eval_every", "checkpoint_every", "stop_after_steps",
            "k_start", "grad_clip",
        )  # fmt: skip
        for name in optional_positive:
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0 or None, got {value}")
        if self.max_tokens < self.batch_tokens:
            raise ValueError(
                f"max_tokens={self.max_tokens} is less than one batch ({self.batch_tokens})"
            )
        if self.sparsity_form not in PENALTY_FORMS:
            raise ValueError(f"sparsity_form must be one of {PENALTY_FORMS}")
        if self.lr_decay not in LR_DECAYS:
            raise ValueError(f"lr_decay must be one of {LR_DECAYS}, got {self.lr_decay!r}")
        if self.eval_jacobian_tokens < 0 or self.lr_warmup_steps < 0:
            raise ValueError("eval_jacobian_tokens and lr_warmup_steps must be >= 0")

    @property
    def total_steps(self) -> int:
        return self.max_tokens // self.batch_tokens

    def warmup(self, steps: int | None) -> int:
        return max(1, self.total_steps // 5) if steps is None else steps


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the run: rank, world size and device."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")


def setup_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group (if ``WORLD_SIZE`` > 1) and choose the device.

    ``device="auto"``: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU. The backend is
    NCCL for CUDA and gloo for the CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=None)
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), dev)
    return DistInfo(0, 1, dev)


def latest_checkpoint(path: str | Path) -> Path:
    """``path`` itself if it is a checkpoint, else its newest ``checkpoints/step_*``."""
    path = Path(path)
    if (path / "trainer.json").is_file():
        return path
    steps = sorted((path / "checkpoints").glob("step_*[0-9]"))
    steps = [s for s in steps if (s / "trainer.json").is_file()]
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {path} (expected checkpoints/step_*/)")
    return steps[-1]


class MetricSums:
    """Sums over the tokens of a log interval, all-reducible: FVU, loss, L0 per rank bucket."""

    def __init__(self, layer: nn.Module, device: torch.device) -> None:
        self.ranks = layer.cfg.ranks if isinstance(layer, MOLT) else (None,)
        self.offsets = layer.cfg.bucket_offsets if isinstance(layer, MOLT) else (0, n_units(layer))
        self.d_out = layer.cfg.d_out
        # [tokens, loss * tokens, squared error, sum |y|^2, active per bucket..., sum y (d_out)]
        self.sums = torch.zeros(
            4 + len(self.ranks) + self.d_out, dtype=torch.float64, device=device
        )

    @torch.no_grad()
    def add(self, loss: Tensor, pred: Tensor, y: Tensor, gates: Tensor, indices: Tensor) -> None:
        y64, n = y.double(), y.shape[0]
        active = gates != 0
        bounds = torch.tensor(self.offsets[1:-1], device=indices.device)
        bucket = torch.bucketize(indices.contiguous(), bounds, right=True)
        per_bucket = [(active & (bucket == b)).sum() for b in range(len(self.ranks))]
        head = [
            torch.tensor(float(n), device=y.device),
            loss.detach().double() * n,
            (pred.detach().double() - y64).square().sum(),
            y64.square().sum(),
        ]
        self.sums += torch.cat([torch.stack(head + per_bucket).double(), y64.sum(0)])

    def reset(self) -> None:
        self.sums.zero_()

    def record(self) -> dict[str, float]:
        s = self.sums.tolist()
        n, head = max(s[0], 1.0), len(self.ranks) + 4
        y_sum = self.sums[head:]
        total = s[3] - float(y_sum.square().sum()) / n
        out = {"loss": s[1] / n, "fvu": s[2] / total if total > 0 else float("nan")}
        per_bucket = [a / n for a in s[4:head]]
        out["l0"] = sum(per_bucket)
        if self.ranks != (None,):
            out.update({f"l0_rank_{r}": v for r, v in zip(self.ranks, per_bucket)})
        return out


class _LayerState:
    """One layer being trained on this rank: the layer, its objective (DDP-wrapped when data
    parallel), optimizer, schedule, dead tracker and metric sums."""

    def __init__(
        self, path: str, layer: nn.Module, out_weight: Tensor, cfg: TrainerConfig, ddp: bool
    ):
        self.path, self.layer = path, layer
        objective = LayerObjective(
            layer, out_weight, cfg.sparsity_form, cfg.sparsity_c, cfg.batch_topk
        )
        self.objective = objective
        self.module: nn.Module = DistributedDataParallel(objective) if ddp else objective
        self.optimizer = torch.optim.AdamW(
            layer.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_factor(
                s, cfg.total_steps, cfg.lr_warmup_steps, cfg.lr_decay, cfg.lr_min_ratio
            ),
        )
        self.tracker = DeadTracker(n_units(layer), cfg.dead_window_tokens)
        self.sums = MetricSums(layer, out_weight.device)
        self.lr_used, self.coef_used = cfg.lr, 0.0  # of the latest step, for the log

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "tracker": self.tracker.state_dict(),
            "out_weight": self.objective.out_weight.cpu(),
            "sums": self.sums.sums.cpu(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.tracker.load_state_dict(state["tracker"])
        self.objective.out_weight.copy_(state["out_weight"])
        self.sums.sums.copy_(state["sums"])


def _file_name(path: str) -> str:
    return path.replace("/", "_")


class Trainer:
    """Train one replacement layer per hookpoint of ``model`` (see the module docstring).

    Args:
        model: the model, in eval mode, on ``dist_info.device``; called as ``model(**inputs)``.
        paths: module paths of the hookpoints (e.g. MLPs) whose input -> output is replaced.
        make_layer: (index, d_in, d_out) -> a fresh layer; called under ``torch.manual_seed(seed
            + index)`` on every rank that holds the layer.
        prepare: texts -> (model kwargs, keep mask [B, T]); the mask is the token mask (padding
            and, as the caller chooses, special tokens are dropped).
        texts: the text stream (training and held-out texts).
        cfg: the run's settings.
        out_dir: where logs, checkpoints and the final layers go.
        dist_info: from :func:`setup_distributed` (default: one CPU process).
        resume: a run directory or checkpoint to continue from.
    """

    def __init__(
        self,
        model: nn.Module,
        paths: Sequence[str],
        make_layer: LayerFactory,
        prepare: Prepare,
        texts: TextStream,
        cfg: TrainerConfig,
        out_dir: str | Path,
        dist_info: DistInfo | None = None,
        resume: str | Path | None = None,
    ) -> None:
        self.model, self.paths, self.prepare, self.texts = model, list(paths), prepare, texts
        self.cfg, self.out_dir = cfg, Path(out_dir)
        self.dist = dist_info or DistInfo()
        rank, world = self.dist.rank, self.dist.world
        self.n_shards = cfg.data_shards or world
        if self.n_shards % world:
            raise ValueError(f"data_shards={self.n_shards} must be a multiple of the {world} ranks")
        if cfg.batch_tokens % self.n_shards:
            raise ValueError(
                f"batch_tokens={cfg.batch_tokens} must be a multiple of data_shards={self.n_shards}"
            )
        self.micro_tokens = cfg.batch_tokens // self.n_shards
        if self.micro_tokens > cfg.buffer_tokens:
            raise ValueError(
                f"buffer_tokens={cfg.buffer_tokens} is smaller than one shard's micro-batch "
                f"({self.micro_tokens} tokens)"
            )
        self.owner = {
            p: (i % world if cfg.distribute_layers else None) for i, p in enumerate(self.paths)
        }
        self.owned = [p for p in self.paths if self.owner[p] in (None, rank)]
        self.local_shards = list(range(rank, self.n_shards, world))
        self.data_parallel = world > 1 and not cfg.distribute_layers
        if cfg.bf16 and self.dist.device.type != "cuda":
            raise ValueError("bf16 is for CUDA devices; on the CPU train in fp32")

        checkpoint = latest_checkpoint(resume) if resume is not None else None
        saved = self._read_checkpoint(checkpoint) if checkpoint is not None else None
        self.start_step = saved["step"] if saved else 0
        self._build_data(saved)
        self.states = self._build_layers(make_layer, checkpoint, saved)
        if saved:
            rng = saved["rng"]
            if rng is not None:  # None when resuming with more processes than were saved
                torch.set_rng_state(rng["torch"])
                if "cuda" in rng:
                    torch.cuda.set_rng_state(rng["cuda"], self.dist.device)
            self._truncate_logs(self.start_step)
        self._eval_rows: dict[str, tuple[Tensor, Tensor]] | None = None

    # -- set-up ---------------------------------------------------------------------------------

    @staticmethod
    def _load(file: Path) -> Any:
        return torch.load(file, map_location="cpu", weights_only=True)

    def _read_checkpoint(self, checkpoint: Path) -> dict[str, Any]:
        """What this rank needs from ``checkpoint``: step, its shards' data, its layers' states
        and its RNG. The layers' weights are read in :meth:`_build_layers`."""
        meta = json.loads((checkpoint / "trainer.json").read_text())
        if meta["paths"] != self.paths or meta["data_shards"] != self.n_shards:
            raise ValueError(
                f"{checkpoint} holds hookpoints {meta['paths']} with {meta['data_shards']} "
                f"data shards; this run has {self.paths} with {self.n_shards}"
            )
        rng = checkpoint / "rng" / f"rank_{self.dist.rank}.pt"
        return {
            "step": meta["step"],
            "data": {
                s: self._load(checkpoint / "data" / f"shard_{s}.pt") for s in self.local_shards
            },
            "states": {
                p: self._load(checkpoint / "state" / f"{_file_name(p)}.pt") for p in self.owned
            },
            "rng": self._load(rng) if rng.is_file() else None,
        }

    def _build_data(self, saved: dict[str, Any] | None) -> None:
        """The row layout (from a probe forward) and one activation source and buffer per local
        data shard, restored from ``saved`` when resuming."""
        cfg = self.cfg
        probe = forward_hookpoints(self.model, self.paths, self.prepare, ["a"])
        self.layout = RowLayout(
            tuple(self.paths),
            tuple(probe[p][0].shape[-1] for p in self.paths),
            tuple(probe[p][1].shape[-1] for p in self.paths),
        )
        self.sources, self.buffers = [], []
        for s in self.local_shards:
            source = ActivationSource(
                self.model, self.paths, self.prepare, self.texts, s, self.n_shards,
                cfg.texts_per_forward, saved["data"][s]["position"] if saved else 0,
            )  # fmt: skip
            buffer = ShufflingBuffer(
                cfg.buffer_tokens,
                self.layout.width,
                lambda source=source: self.layout.join(source.forward()),
                seed=cfg.seed * 1_000_003 + s,
                device=self.dist.device,
                dtype=probe[self.paths[0]][0].dtype,
            )
            if saved:
                buffer.load_state_dict(saved["data"][s]["buffer"])
            self.sources.append(source)
            self.buffers.append(buffer)

    def _build_layers(
        self, make_layer: LayerFactory, checkpoint: Path | None, saved: dict[str, Any] | None
    ) -> dict[str, _LayerState]:
        """The layers held on this rank with their optimizers: fresh and initialised from data,
        or restored from the checkpoint."""
        layers = {}
        for i, path in enumerate(self.paths):
            if path in self.owned:
                torch.manual_seed(self.cfg.seed + i)
                layer = make_layer(i, self.layout.d_in[i], self.layout.d_out[i])
                layers[path] = layer.to(self.dist.device)
        if saved:
            for path, layer in layers.items():
                self._restore_weights(checkpoint / "layers" / _file_name(path), layer)
            weights = {path: saved["states"][path]["out_weight"] for path in layers}
        else:
            weights = self._initialise(layers)
        states = {}
        for path, layer in layers.items():
            out_weight = weights[path].to(self.dist.device)
            states[path] = _LayerState(path, layer, out_weight, self.cfg, self.data_parallel)
            if saved:
                states[path].load_state_dict(saved["states"][path])
        return states

    @staticmethod
    def _restore_weights(where: Path, layer: nn.Module) -> None:
        config = read_config(where, layer.KIND)
        if config != layer.cfg.to_dict():
            raise ValueError(f"{where} holds {config}; this run builds {layer.cfg.to_dict()}")
        check_weights_header(where, {n: t.shape for n, t in layer.state_dict().items()})
        layer.load_state_dict(load_file(str(Path(where) / WEIGHTS_FILE)))

    # -- data ---------------------------------------------------------------------------------

    def _gather_shards(self, local: list[Tensor], to: int | None) -> list[Tensor] | None:
        """Every shard's tensor in shard order, on all ranks (``to=None``) or on rank ``to``
        (the others get None). ``local``: this rank's shards' tensors, one shape for all."""
        world = self.dist.world
        if world == 1:
            return local
        stacked = torch.stack(local)
        if to is None:
            parts = [torch.empty_like(stacked) for _ in range(world)]
            dist.all_gather(parts, stacked)
        else:
            parts = (
                [torch.empty_like(stacked) for _ in range(world)] if self.dist.rank == to else None
            )
            dist.gather(stacked, parts, dst=to)
            if parts is None:
                return None
        return [parts[s % world][s // world] for s in range(self.n_shards)]

    def _initialise(self, layers: dict[str, nn.Module]) -> dict[str, Tensor]:
        """Data-aware init of every layer and its output weights, from the first
        ``init_tokens`` rows of the shards (the same global sample on every rank)."""
        per_shard = max(1, self.cfg.init_tokens // self.n_shards)
        if per_shard > self.cfg.buffer_tokens:
            raise ValueError("init_tokens / data_shards must not exceed buffer_tokens")
        local = [buffer.peek(per_shard) for buffer in self.buffers]
        rows = torch.cat(self._gather_shards(local, None))
        pairs = self.layout.split(rows)
        weights = {}
        for path, layer in layers.items():
            x, y = pairs[path]
            if self.cfg.init_from_data:
                init_from_data(layer, x, y)
            dtype = next(layer.parameters()).dtype
            weights[path] = output_weights(y.to(dtype), self.cfg.standardize_outputs)
        return weights

    def _micro_batches(self) -> dict[str, list[tuple[Tensor, Tensor]]]:
        """This step's micro-batches (x, y) of every layer held here, one per data shard that
        feeds it: the local shards (data parallel) or all shards (distributed layers)."""
        local = [self.layout.split(buffer.take(self.micro_tokens)) for buffer in self.buffers]
        out: dict[str, list[tuple[Tensor, Tensor]]] = {}
        for i, path in enumerate(self.paths):
            pairs = [part[path] for part in local]
            if not self.cfg.distribute_layers:
                out[path] = [(x.contiguous(), y.contiguous()) for x, y in pairs]
                continue
            joined = [torch.cat(pair, dim=1) for pair in pairs]
            gathered = self._gather_shards(joined, self.owner[path])
            if gathered is not None:
                d_in = self.layout.d_in[i]
                out[path] = [(t[:, :d_in].contiguous(), t[:, d_in:].contiguous()) for t in gathered]
        return out

    # -- training -----------------------------------------------------------------------------

    def _k(self, layer: nn.Module, step: int) -> int | None:
        cfg = self.cfg
        if cfg.k_start is None:
            return layer.cfg.k
        if layer.cfg.k is None:
            raise ValueError("k annealing needs layers with a k (not k=None)")
        return annealed_k(step, cfg.k_start, layer.cfg.k, cfg.warmup(cfg.k_anneal_steps))

    def _train_step(self, state: _LayerState, micro: list[tuple[Tensor, Tensor]], step: int):
        cfg, layer = self.cfg, state.layer
        k = self._k(layer, step)
        coef = cfg.sparsity_coef * linear_warmup(step + 1, cfg.warmup(cfg.sparsity_warmup_steps))
        device_type = self.dist.device.type
        autocast = torch.autocast(device_type, torch.bfloat16) if cfg.bf16 else nullcontext()
        state.optimizer.zero_grad(set_to_none=True)
        fired = torch.zeros(n_units(layer), dtype=torch.bool, device=self.dist.device)
        for j, (x, y) in enumerate(micro):
            last = j == len(micro) - 1
            sync = nullcontext() if last or not self.data_parallel else state.module.no_sync()
            with sync:
                with autocast:
                    x_in = x.to(torch.bfloat16) if cfg.bf16 else x
                    loss, pred, gates, indices = state.module(x_in, y, k, coef)
                (loss / len(micro)).backward()
            state.sums.add(loss, pred, y, gates, indices)
            fired |= fired_units(gates.detach(), indices, len(fired))
        if self.data_parallel:
            fired_any = fired.to(torch.int32)
            dist.all_reduce(fired_any, op=dist.ReduceOp.MAX)
            fired = fired_any.bool()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(layer.parameters(), cfg.grad_clip)
        state.lr_used = state.optimizer.param_groups[0]["lr"]
        state.coef_used = coef
        state.optimizer.step()
        state.scheduler.step()
        state.tracker.mark(fired, cfg.batch_tokens)
        reopen = isinstance(layer, MOLT) and cfg.revive_every and (step + 1) % cfg.revive_every == 0
        if reopen and state.tracker.tokens_seen >= state.tracker.window:
            dead = state.tracker.dead_mask()
            if dead.any():  # the same on every rank: the fired sets were all-reduced
                xs = [x for x, _ in micro]
                if self.data_parallel:
                    xs = self._gather_shards([torch.cat(xs)], None)
                fit_gate_bias(layer, torch.cat(xs), dead.to(self.dist.device))

    # -- logs, evaluation, checkpoints ---------------------------------------------------------

    def _log_path(self, path: str) -> Path:
        return self.out_dir / "logs" / f"{_file_name(path)}.jsonl"

    def _writes_for(self, path: str) -> bool:
        """Whether this rank writes the logs, checkpoints and final layer of ``path``."""
        return self.owner[path] == self.dist.rank or (
            self.owner[path] is None and not self.dist.rank
        )

    def _write_record(self, path: str, record: dict[str, Any]) -> None:
        if self._writes_for(path):
            record["rank"] = self.dist.rank
            log = self._log_path(path)
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def _truncate_logs(self, step: int) -> None:
        """Drop the records an interrupted run wrote after the checkpoint it resumes from."""
        for path in self.owned:
            log = self._log_path(path)
            if self._writes_for(path) and log.is_file():
                lines = log.read_text().splitlines(keepends=True)
                log.write_text("".join(ln for ln in lines if json.loads(ln)["step"] <= step))

    def _log(self, step: int, timing: dict[str, float]) -> dict[str, Any]:
        """Write every held layer's record of the interval ending at ``step``; return the last.

        ``timing``: ``tokens_per_s`` (global tokens per wall second) and ``cpu_s`` (this
        process's CPU seconds, all threads), both over the interval since the previous record,
        which includes any evaluation and checkpoint in it. On a shared machine the CPU time
        tells how much of the wall time the run actually computed.
        """
        record: dict[str, Any] = {}
        for state in self.states.values():
            if self.data_parallel:
                dist.all_reduce(state.sums.sums)
            layer = state.layer
            record = {"step": step + 1, "tokens": (step + 1) * self.cfg.batch_tokens}
            record.update(state.sums.record())
            record.update(
                dead_fraction=state.tracker.dead_fraction(),
                lr=state.lr_used,
                k=self._k(layer, step),
                sparsity_coef=state.coef_used if isinstance(layer, MOLT) else 0.0,
                **timing,
            )
            self._write_record(state.path, record)
            state.sums.reset()
        return record

    @torch.no_grad()
    def _evaluate(self, step: int) -> None:
        cfg = self.cfg
        writers = [p for p in self.owned if self._writes_for(p)]
        if not writers:
            return
        if self._eval_rows is None:
            self._eval_rows = collect_rows(
                self.model, self.paths, self.prepare, self.texts.heldout(), cfg.eval_tokens,
                cfg.texts_per_forward,
            )  # fmt: skip
        for path in writers:
            layer = self.states[path].layer
            x, y = self._eval_rows[path]
            gates, indices = layer.encode(x)
            pred = layer.decode(x, gates, indices)
            record: dict[str, Any] = {
                "step": step + 1,
                "tokens": (step + 1) * cfg.batch_tokens,
                "eval_tokens": len(x),
                "eval_fvu": float(fvu(pred, y)),
                "eval_l0": float(l0(gates)),
            }
            xj = x[: cfg.eval_jacobian_tokens]
            if len(xj):
                jac = molt_jacobian if isinstance(layer, MOLT) else transcoder_jacobian
                with torch.enable_grad():
                    mlp = module_jacobian(get_module(self.model, path), xj)
                cos = jacobian_cosine(jac(layer, xj), mlp)
                record["eval_jacobian_cosine"] = float(cos.mean())
            self._write_record(path, record)

    def _barrier(self) -> None:
        if self.dist.world > 1:
            dist.barrier()

    def _checkpoint(self, step: int) -> None:
        rank, root = self.dist.rank, self.out_dir / "checkpoints"
        final = root / f"step_{step + 1:08d}"
        tmp = root / f"{final.name}.tmp"
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        for sub in ("layers", "state", "data", "rng"):
            (tmp / sub).mkdir(exist_ok=True)
        for path, state in self.states.items():
            if self._writes_for(path):
                state.layer.save_pretrained(tmp / "layers" / _file_name(path))
                torch.save(state.state_dict(), tmp / "state" / f"{_file_name(path)}.pt")
        for shard, source, buffer in zip(self.local_shards, self.sources, self.buffers):
            data = {"position": source.position, "buffer": buffer.state_dict()}
            torch.save(data, tmp / "data" / f"shard_{shard}.pt")
        rng = {"torch": torch.get_rng_state()}
        if self.dist.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.dist.device)
        torch.save(rng, tmp / "rng" / f"rank_{rank}.pt")
        self._barrier()
        if rank == 0:
            meta = {
                "step": step + 1,
                "tokens": (step + 1) * self.cfg.batch_tokens,
                "paths": self.paths,
                "data_shards": self.n_shards,
                "world_size": self.dist.world,
                "config": asdict(self.cfg),
            }
            (tmp / "trainer.json").write_text(json.dumps(meta, indent=1) + "\n")
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            done = sorted(p for p in root.glob("step_*[0-9]") if (p / "trainer.json").is_file())
            for old in done[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old)
        self._barrier()

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> dict[str, nn.Module]:
        """Train to ``max_tokens`` (or ``stop_after_steps``); returns the layers held here."""
        from tqdm.auto import tqdm

        cfg, total = self.cfg, self.cfg.total_steps
        end = (
            total
            if cfg.stop_after_steps is None
            else min(total, self.start_step + cfg.stop_after_steps)
        )
        show = cfg.progress and self.dist.rank == 0
        bar = tqdm(
            total=total, initial=self.start_step, unit="step", disable=None if show else True
        )
        clock = (time.perf_counter(), time.process_time(), self.start_step)
        for step in range(self.start_step, end):
            micro = self._micro_batches()
            for path, state in self.states.items():
                self._train_step(state, micro[path], step)
            last = step + 1 == total
            if (step + 1) % cfg.log_every == 0 or last:
                now = (time.perf_counter(), time.process_time(), step + 1)
                tokens = (now[2] - clock[2]) * cfg.batch_tokens
                record = self._log(
                    step,
                    {
                        "tokens_per_s": tokens / max(now[0] - clock[0], 1e-9),
                        "cpu_s": now[1] - clock[1],
                    },
                )
                clock = now
                if record:
                    bar.set_postfix(fvu=f"{record['fvu']:.3f}", l0=f"{record['l0']:.1f}")
            if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last:
                self._evaluate(step)
            if (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0) or (
                step + 1 == end and not last
            ):
                self._checkpoint(step)
            bar.update(1)
        bar.close()
        if end == total:
            for path, state in self.states.items():
                if self._writes_for(path):
                    state.layer.save_pretrained(self.out_dir / "layers" / _file_name(path))
        return {path: state.layer for path, state in self.states.items()}
