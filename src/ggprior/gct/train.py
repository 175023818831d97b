"""Data-parallel training of a task model, one communication method per run.

Every worker builds the same tokenizer, data and seeded model, keeps its shard of the training
data (examples ``rank::workers``, cut to equal length so all workers take the same number of
steps), wraps the model in DDP with the method's hook (:func:`ggprior.gct.launch.wrap_ddp`)
and runs the ordinary trainer (:func:`ggprior.train.train`) on it. Worker 0 also evaluates
(validation after every epoch, test at the end). The per-worker batch is ``batch_size``, so one
step sees ``workers * batch_size`` examples.

:func:`data_parallel` runs one configuration with :func:`~.launch.launch` (``--workers N``);
:func:`worker` is the function each process runs, also usable under torchrun (:func:`main_torchrun`).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from ..tasks import TaskData, build_model, count_parameters, initialize_, load_task, task_kind
from ..tasks.tokenizer import get_tokenizer
from ..train.loop import TrainConfig, train
from .hook import GCTConfig, GCTError
from .launch import METHODS, from_env, init_worker, launch, wrap_ddp


@dataclass
class DPConfig:
    """One data-parallel run: task, model, method and trainer settings (``train.batch_size`` per worker).

    ``init`` "default" keeps transformers' init; else :func:`ggprior.models.initialize_` (``gamma`` for gg).
    """

    method: str = "gct"
    task: str = "sentiment"
    model: str = "bert"
    scale: int = 1
    max_len: int = 64
    vocab_size: int = 4096
    max_train: int | None = None
    max_eval: int | None = None
    init: str = "default"
    gamma: float = 2.0
    gct: GCTConfig = field(default_factory=GCTConfig)
    powersgd_rank: int = 2
    powersgd_start: int = 10
    timeout: float = 120.0
    train: TrainConfig = field(default_factory=lambda: TrainConfig(progress=False))

    def validate(self) -> None:
        if self.method not in METHODS:
            raise GCTError(f"unknown method {self.method!r}; known: {', '.join(METHODS)}")
        if self.powersgd_rank < 1 or self.powersgd_start < 2:
            raise GCTError(f"need powersgd_rank >= 1 and powersgd_start >= 2 (torch's PowerSGD with error "
                           f"feedback starts after two plain steps): {self}")
        self.gct.validate()
        self.train.validate()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DPConfig:
        d = dict(d)
        d["gct"] = GCTConfig(**d.get("gct", {}))
        d["train"] = TrainConfig(**d.get("train", {}))
        return cls(**d)


def shard(data: TaskData, rank: int, workers: int) -> TaskData:
    """Examples ``rank, rank + workers, ...`` of ``data``, ``len(data) // workers`` of them."""
    per = len(data) // workers
    if per == 0:
        raise GCTError(f"{data.name}/{data.split}: {len(data)} examples cannot be shared by {workers} workers")
    idx = torch.arange(rank, per * workers, workers)
    return TaskData(data.name, data.split, data.kind, {k: v[idx] for k, v in data.tensors.items()},
                    num_labels=data.num_labels, pad_id=data.pad_id, meta=dict(data.meta, shard=f"{rank}/{workers}"))


def _checksum(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def worker(rank: int, workers: int, cfg_dict: dict) -> dict:
    """Train one shard in an initialised process group; returns metrics (worker 0) and comm counts."""
    cfg = DPConfig.from_dict(cfg_dict)
    cfg.validate()
    torch.set_num_threads(1)
    kind = task_kind(cfg.task)
    tok = get_tokenizer("minilm") if cfg.model == "minilm" else get_tokenizer("bpe", cfg.task, cfg.vocab_size)
    train_data = shard(load_task(cfg.task, "train", tok, cfg.max_len, max_examples=cfg.max_train), rank, workers)
    evals = [load_task(cfg.task, s, tok, cfg.max_len, max_examples=cfg.max_eval) for s in ("validation", "test")]
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, kind, vocab_size=tok.vocab_size, num_labels=max(train_data.num_labels, 2),
                        max_positions=cfg.max_len, pad_id=tok.pad_id, scale=cfg.scale)
    if cfg.init != "default" and cfg.model != "minilm":
        initialize_(model, cfg.init, cfg.gamma, generator=torch.Generator().manual_seed(cfg.train.seed))
    device = torch.device(cfg.train.device)
    ddp, stats = wrap_ddp(model, cfg.method, device, gct=cfg.gct, powersgd_rank=cfg.powersgd_rank,
                          powersgd_start=cfg.powersgd_start)
    lead = rank == 0
    result = train(ddp, train_data, evals[0] if lead else None, cfg.train, test_data=evals[1] if lead else None)
    sums = [None] * workers
    dist.all_gather_object(sums, _checksum(model))
    if len(set(sums)) != 1:
        raise GCTError(f"workers ended with different parameters: {sums}")
    steps = result["steps"]
    train_seconds = sum(row["seconds"] for row in result["history"])
    return {"rank": rank, "workers": workers, "config": cfg.to_dict(), "metrics": result if lead else None,
            "comm": stats.summary(), "seconds_per_step": train_seconds / max(steps, 1), "steps": steps,
            "parameters": count_parameters(model), "values_per_step": sum(p.numel() for p in model.parameters()),
            "params_checksum": sums[0]}


def data_parallel(cfg: DPConfig, workers: int = 2, *, deadline: float | None = None,
                  start_method: str = "spawn") -> list[dict]:
    """Run ``cfg`` on ``workers`` local processes; the per-worker results in rank order."""
    cfg.validate()
    return launch(worker, workers, (cfg.to_dict(),), timeout=cfg.timeout, device=cfg.train.device,
                  deadline=deadline, start_method=start_method)


def main_torchrun(cfg: DPConfig) -> dict | None:
    """Under ``torchrun``: join the group from the environment, train, return worker 0's result (else None)."""
    env = from_env()
    if env is None:
        raise GCTError("not started by torchrun (RANK / WORLD_SIZE not set)")
    rank, workers = env
    cfg.validate()
    init_worker(rank, workers, timeout=cfg.timeout, device=cfg.train.device)
    try:
        out = worker(rank, workers, cfg.to_dict())
    finally:
        dist.destroy_process_group()
    return out if rank == 0 else None
