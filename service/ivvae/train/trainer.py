"""``ivvae train``: the IV-VAE two-stage recipe, on one CPU or many GPUs (torchrun/DDP).

Stage ``image`` (steps ``[0, image_steps)``): single frames, the keyframe path only (see
``ktc``): an image VAE with half the latent width. Stage ``video`` (the next
``video_steps`` steps): 1+4N-frame windows, all weights, starting from the stage-1 weights.

Loss: L1 (or Charbonnier) + ``kl_weight`` * KL (mean-reduced over latent elements)
+ optional ``ssim_weight`` * (1 - SSIM) + optional hinge-GAN term (``--adversarial``, a small
3-D patch discriminator trained from scratch; no pretrained perceptual network is used).

Determinism and exact resume: each step's batch and reparameterisation noise are pure
functions of (seed, rank, step); checkpoints hold model, optimizer, step and a listing of
the clips (a resume on other data is refused). Resuming from step s reproduces the
uninterrupted run's loss at step s bit for bit (same thread count).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from ..core import strict
from ..core.files import atomic_write
from ..core.geometry import latent_shape
from ..model.checkpoint import (
    load_model,
    nonfinite_parameters,
    save_safetensors,
    save_tensors,
)
from ..model.config import IVVAEConfig
from ..model.device import parse_device, torch_device
from ..model.vae import IVVAE
from .config import TrainConfig
from .data import ClipDataset, default_train_clips, estimate_bytes, expand_sources
from .ktc import KeyframeMask
from .metrics import charbonnier, kl_divergence, psnr_per_frame, ssim_per_frame


class PatchDiscriminator(nn.Module):
    """A small 3-D conv patch discriminator for the optional hinge-GAN term."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv3d(3, width, (3, 4, 4), stride=(1, 2, 2), padding=(1, 1, 1)),
            nn.LeakyReLU(0.2),
            nn.Conv3d(width, 2 * width, (3, 4, 4), stride=(1, 2, 2), padding=(1, 1, 1)),
            nn.GroupNorm(8, 2 * width),
            nn.LeakyReLU(0.2),
            nn.Conv3d(2 * width, 4 * width, (3, 4, 4), stride=(2, 2, 2), padding=(1, 1, 1)),
            nn.GroupNorm(8, 4 * width),
            nn.LeakyReLU(0.2),
            nn.Conv3d(4 * width, 1, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Objective(nn.Module):
    """The training forward pass as one module (what DDP wraps)."""

    def __init__(self, vae: IVVAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: Tensor, eps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mu, logvar, _ = self.vae.encode_step(x, None)
        z = mu + torch.exp(0.5 * logvar) * eps
        rec, _ = self.vae.decode_step(z, None)  # factors are 1/0 while training
        return rec, mu, logvar


@dataclass
class StepLog:
    step: int
    stage: str
    loss: float
    rec: float
    kl: float
    psnr: float
    lr: float
    frames_per_s: float
    extra: dict[str, float] = field(default_factory=dict)


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolve_device(name: str) -> torch.device:
    """``auto``: the GPU when CUDA is there, else the CPU. A GPU without an index is this
    process's (``LOCAL_RANK`` under torchrun)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = parse_device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


def newest_checkpoint(out: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest whole checkpoint folder in ``out`` and its state (None: there is none),
    without changing anything. A save writes ``checkpoint.tmp`` (its ``state.json`` last,
    so one that reads is whole), moves ``checkpoint`` aside to ``checkpoint.old`` and the
    new one in: a save killed midway leaves the newest whole one under any of the three."""
    found = []
    for candidate in (out / "checkpoint", out / "checkpoint.tmp", out / "checkpoint.old"):
        try:
            state: dict[str, Any] = json.loads((candidate / "state.json").read_text())
        except (OSError, ValueError):
            continue
        found.append((int(state.get("step", -1)), candidate, state))
    if not found:
        return None
    _, folder, state = max(found, key=lambda f: f[0])  # a tie keeps the first: checkpoint
    return folder, state


def recover_checkpoint(out: Path) -> dict[str, Any] | None:
    """``newest_checkpoint``, moved into place as ``out/checkpoint`` (the next save then
    proceeds as usual); its state, or None."""
    newest = newest_checkpoint(out)
    if newest is None:
        return None
    folder, state = newest
    ckpt = out / "checkpoint"
    if folder != ckpt:
        shutil.rmtree(ckpt, ignore_errors=True)
        folder.rename(ckpt)
    return state


# The lock file inside a run folder, held by the one run that writes there.
LOCK_NAME = "lock"


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Own the run folder ``out`` while the block runs: a second run into it would interleave
    its step log with this one's and save its checkpoints over them. The lock goes with the
    process (a killed run leaves none behind); the file holds the owner's pid for the
    message."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
            by = f" (pid {pid})" if pid.isdigit() else ""
            raise ValueError(f"{out} is in use by another ivvae train run{by}: wait for it "
                             "to end, or give this one another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM through the CLI) stopped ``fit`` after a whole step, whose
    checkpoint it saved: resuming from it is as exact as from a periodic one."""

    def __init__(self, step: int) -> None:
        super().__init__(f"interrupted; the checkpoint of step {step} is saved")
        self.step = step


class Diverged(ValueError):
    """The loss stopped being a finite number: the weights are lost, the checkpoint is not."""


def _check_memory(paths: list[Path], cfg: TrainConfig,
                  say: Callable[[str], None] | None) -> None:
    """Refuse data whose decoded frames would not fit in this machine's memory, before
    decoding them for minutes and then being killed (every rank on it holds them all)."""
    from ..memory import machine_memory_bytes

    need, unknown = estimate_bytes(paths, max_side=cfg.max_side,
                                   max_frames=cfg.max_clip_frames,
                                   extra_scales=cfg.extra_scales)
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    have = machine_memory_bytes()
    unsure = f", not counting {unknown} that declare no frame count" if unknown else ""
    if say is not None:
        say(f"loading training data: {len(paths)} files, about {need / 1e6:.0f} MB decoded"
            f"{f' in each of {ranks} ranks' if ranks > 1 else ''}{unsure}")
    if need * ranks > have:
        each = f" in each of the {ranks} ranks here" if ranks > 1 else ""
        raise ValueError(
            f"the training data would take about {need / 1e9:.1f} GB decoded in memory"
            f"{each} ({len(paths)} files{unsure}; every frame is held, at most --max-side "
            f"{cfg.max_side} px on its short side), more than this machine's "
            f"{have / 1e9:.1f} GB: train on fewer clips, or lower --max-clip-frames "
            f"({cfg.max_clip_frames}) or --max-side, or drop --extra-scales")


def _export_name(path: str | os.PathLike[str], cfg: TrainConfig) -> str:
    """The export's file name when it is a model name (``--export ivvae_faces_v2.safetensors``
    serves as ``ivvae_faces_v2``): every run's export was ``ivvae_z16_dim16_trained``, and
    two served side by side shared it."""
    stem = Path(path).name.removesuffix(".safetensors")
    try:
        return strict.model_name(stem)
    except ValueError:
        return f"ivvae_z{cfg.z_dim}_dim{cfg.dim}_trained"


def _check_init_weights(path: str, found: IVVAEConfig, wanted: IVVAEConfig) -> None:
    names = ("z_dim", "dim", "num_res_blocks", "dim_mult")
    differ = [n for n in names if getattr(found, n) != getattr(wanted, n)]
    if not differ:
        return

    def sizes(cfg: IVVAEConfig) -> str:
        return ", ".join(f"{n} {getattr(cfg, n)}" for n in names[:3])

    fix = ("ivvae train builds only dim_mult (1, 2, 4, 4)" if differ == ["dim_mult"]
           else f"pass --z-dim {found.z_dim} --dim {found.dim} --num-res-blocks "
                f"{found.num_res_blocks}, or other weights")
    raise ValueError(f"--init-weights {path} is a model of {sizes(found)}"
                     f"{f', dim_mult {found.dim_mult}' if 'dim_mult' in differ else ''}; "
                     f"this run is set for {sizes(wanted)}: {fix}")


def _data_changed(folder: Path, step: int, was: dict[str, str], now: dict[str, str]) -> str:
    def some(names: list[str]) -> str:
        return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")

    kinds = {"added": [n for n in now if n not in was],
             "removed": [n for n in was if n not in now],
             "changed": [n for n in now if n in was and was[n] != now[n]]}
    what = "; ".join(f"{len(names)} clip(s) {kind} ({some(names)})"
                     for kind, names in kinds.items() if names) or "the clips' order changed"
    return (f"the training data are not those of the checkpoint in {folder} (step {step}): "
            f"{what}; {len(was)} clips then, {len(now)} now. Resuming would not continue "
            "that run: put the data back as they were, or start a new run with another "
            f"--out (--init-weights {folder / 'model.safetensors'} starts it from these "
            "weights)")


def _checkpoint_tensors(path: Path, device: str = "cpu") -> dict[str, Tensor]:
    try:
        return load_file(str(path), device=device)
    except FileNotFoundError:
        raise
    except Exception as exc:  # safetensors' own SafetensorError is no ValueError
        raise ValueError(
            f"{path} is damaged ({' '.join(str(exc).split())}): the run cannot go on exactly "
            f"from it. Start a new run with another --out and --init-weights "
            f"{path.parent / 'model.safetensors'} (its weights, a fresh optimizer)") from exc


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], list[Any]]:
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            t = value if isinstance(value, Tensor) else torch.tensor(value)
            tensors[f"{idx}.{name}"] = t.detach().cpu().contiguous()
    return tensors, sd["param_groups"]


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, Tensor],
                       groups: list[Any]) -> None:
    state: dict[int, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = t
    opt.load_state_dict({"state": state, "param_groups": groups})


class Trainer:
    def __init__(self, cfg: TrainConfig, *, dataset: ClipDataset | None = None,
                 on_log: Callable[[StepLog], None] | None = None,
                 say: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.rank, self.world = _dist_info()
        self.device = resolve_device(cfg.device)
        torch_device(str(self.device))  # a GPU this torch can use
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = True  # fixed shapes per stage
        self.on_log = on_log
        # Files and clips left out, a line each saying why (the CLI prints them): one
        # unreadable or tiny file among thousands must not stop a run, nor fail it at the
        # step whose batch first draws it.
        self.skipped: list[str] = []
        if dataset is None:
            paths = (expand_sources(cfg.data, self.skipped) if cfg.data
                     else default_train_clips())
            say = say if self.rank == 0 else None
            _check_memory(paths, cfg, say)
            dataset = ClipDataset.from_paths(paths, max_side=cfg.max_side,
                                             max_frames=cfg.max_clip_frames,
                                             extra_scales=cfg.extra_scales,
                                             skipped=self.skipped, say=say)
        # Each stage draws from the clips that hold its window: a clip too short for the
        # video stage's frames still serves the image stage.
        windows = {"image": (cfg.image_steps, 1, cfg.image_crop),
                   "video": (cfg.video_steps, cfg.frames, cfg.video_crop)}
        self.stage_data = {stage: dataset.fitting(frames, crop, self.skipped, stage=stage)
                           for stage, (steps, frames, crop) in windows.items() if steps}
        empty = [stage for stage, data in self.stage_data.items() if not data.clips]
        if empty:
            reasons = "; ".join(self.skipped[:3]) + (" ..." if len(self.skipped) > 3 else "")
            raise ValueError(f"no training clip is usable in the {empty[0]} stage: {reasons}")
        used = {name for data in self.stage_data.values() for name in data.names}
        keep = [i for i, name in enumerate(dataset.names) if name in used]
        self.data = ClipDataset([dataset.clips[i] for i in keep],
                                [dataset.names[i] for i in keep])  # every clip some stage uses
        self.listing = self.data.listing()
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        model_cfg = IVVAEConfig(z_dim=cfg.z_dim, dim=cfg.dim, num_res_blocks=cfg.num_res_blocks)
        if cfg.init_weights:
            self.vae = load_model(cfg.init_weights, scale_factor=1.0, shift_factor=0.0)
            # The run's config is what the checkpoint records and a resume compares: the
            # weights must be of that model, not silently of the file's.
            _check_init_weights(cfg.init_weights, self.vae.cfg, model_cfg)
            # Its name is not this run's: the checkpoints were labelled as the bundled model
            # (eval said so, and so did latents encoded with them). Unnamed, they are named
            # by their size, as a run from scratch's are.
            self.vae.name = ""
        else:
            self.vae = IVVAE(model_cfg)
            k = model_cfg.half_z
            with torch.no_grad():  # logvar = [conv_2d rows k:, conv_3d rows k:]
                for conv in (self.vae.quant_conv.conv_2d, self.vae.quant_conv.conv_3d):
                    bias = conv.bias
                    assert isinstance(bias, Tensor)
                    bias[k:] = cfg.init_logvar
        self.vae.to(self.device).train().requires_grad_(True)
        self.mask = KeyframeMask(self.vae)
        self.disc = PatchDiscriminator().to(self.device) if cfg.adversarial else None
        self.step = 0
        # The moving average (float32, state-dict names) when cfg.ema_decay > 0; made from
        # the weights after the first step (after stage 1's mask has zeroed its blocks).
        self.ema: dict[str, Tensor] | None = None
        self.opt: torch.optim.Optimizer | None = None
        self.disc_opt: torch.optim.Optimizer | None = None
        self.objective: nn.Module = Objective(self.vae)
        self._stage: str | None = None

    # -- stage setup -----------------------------------------------------------------------

    def _enter_stage(self, stage: str) -> None:
        if stage == self._stage:
            return
        self._stage = stage
        if stage == "image" and not self.cfg.init_weights:
            self.mask.zero_weights()
        params = list(self.vae.parameters())
        self.opt = torch.optim.Adam(params, lr=self.cfg.lr, betas=(0.9, 0.99))
        if self.disc is not None:
            self.disc_opt = torch.optim.Adam(self.disc.parameters(), lr=self.cfg.lr,
                                             betas=(0.5, 0.9))
        objective: nn.Module = Objective(self.vae)
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # time_conv layers are unused on single frames (stage 1)
            ids = [self.device.index] if self.device.type == "cuda" else None
            objective = DDP(objective, device_ids=ids,
                            find_unused_parameters=(stage == "image"))
        self.objective = objective

    # -- checkpoints -----------------------------------------------------------------------

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoint"

    def save(self) -> None:
        # On every rank (they hold the same weights): one that stopped alone would leave
        # the others waiting at the barrier after the save.
        if nonfinite_parameters(self.vae):
            raise Diverged(f"the weights hold NaN or infinite values after step {self.step}: "
                           "training diverged; the last checkpoint is kept. Lower --lr and "
                           "run again")
        if self.rank != 0:
            return
        assert self.opt is not None
        tmp = self.out / "checkpoint.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_safetensors(self.vae, tmp / "model.safetensors")
        opt_tensors, groups = _optimizer_tensors(self.opt)
        save_tensors(opt_tensors, tmp / "optim.safetensors")
        state: dict[str, Any] = {"step": self.step, "stage": self._stage,
                                 "config": dataclasses.asdict(self.cfg), "param_groups": groups,
                                 "data_listing": self.listing}
        if self.disc is not None and self.disc_opt is not None:
            save_tensors({k: v.detach().cpu().contiguous()
                          for k, v in self.disc.state_dict().items()},
                         tmp / "disc.safetensors")
            d_tensors, d_groups = _optimizer_tensors(self.disc_opt)
            save_tensors(d_tensors, tmp / "disc_optim.safetensors")
            state["disc_param_groups"] = d_groups
        if self.ema is not None:  # a weights file like model.safetensors: `ivvae eval` reads it
            save_safetensors(self._model_of(self.ema), tmp / "ema.safetensors")
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        old = self.out / "checkpoint.old"
        shutil.rmtree(old, ignore_errors=True)
        if self.ckpt_dir.exists():
            self.ckpt_dir.rename(old)
        tmp.rename(self.ckpt_dir)
        shutil.rmtree(old, ignore_errors=True)

    def resume(self, *, recover: bool = True) -> bool:
        """Load the newest checkpoint in ``out`` if there is one. Returns whether it did.
        ``recover``: first move it into place after a save that was killed midway (what a
        run that goes on needs); without, nothing in ``out`` changes (an export while the
        run that owns the folder is still going)."""
        if recover:
            if self.rank == 0:
                recover_checkpoint(self.out)
            if self.world > 1:
                dist.barrier()
        newest = newest_checkpoint(self.out)
        if newest is None:
            if recover and self.rank == 0:
                self._trim_log(0)
            return False
        folder, state = newest
        # Anything but these changes the run; video_steps may grow to train longer, and the
        # moving average only watches the weights (switched on later, it starts then).
        free = {"out", "save_every", "log_every", "video_steps", "device", "ema_decay"}
        saved = state["config"]
        mine = dataclasses.asdict(self.cfg)
        mine = {k: list(v) if isinstance(v, tuple) else v for k, v in mine.items()}
        # An option added after the checkpoint was made counts as its default there.
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}

        def same(key: str) -> bool:
            was = saved.get(key, defaults[key])
            if key == "data":  # paths, however spelled (the CLI gives absolute ones)
                return list(map(os.path.abspath, was)) == list(map(os.path.abspath, mine[key]))
            return bool(was == mine[key])

        changed = sorted(k for k in mine if k not in free and not same(k))
        if changed:
            detail = "; ".join(f"{k}: {saved.get(k, defaults[k])!r} then, {mine[k]!r} now"
                               for k in changed)
            raise ValueError(f"the checkpoint in {folder} was made with other "
                             f"settings ({detail}): use them, or another --out")
        # Batches are drawn by index from the clips: other clips under the same --data make
        # another run. (An export only fits its factors on the data as they are now.)
        listing = state.get("data_listing")  # None: a checkpoint from before it was kept
        if recover and listing is not None and list(listing.items()) != list(
                self.listing.items()):
            raise ValueError(_data_changed(folder, int(state["step"]), listing, self.listing))
        loaded = load_model(folder / "model.safetensors", scale_factor=1.0,
                            shift_factor=0.0)
        with torch.no_grad():
            for p, q in zip(self.vae.parameters(), loaded.parameters(), strict=True):
                p.copy_(q)
        self.step = int(state["step"])
        if recover and self.rank == 0:
            self._trim_log(self.step)
        if self.cfg.ema_decay > 0 and (folder / "ema.safetensors").exists():
            ema = load_model(folder / "ema.safetensors", scale_factor=1.0,
                             shift_factor=0.0)
            self.ema = {k: v.float().to(self.device) for k, v in ema.state_dict().items()}
        self._enter_stage(state["stage"])
        assert self.opt is not None
        _restore_optimizer(self.opt, _checkpoint_tensors(folder / "optim.safetensors"),
                           state["param_groups"])
        if self.disc is not None and self.disc_opt is not None:
            self.disc.load_state_dict(_checkpoint_tensors(folder / "disc.safetensors",
                                                          str(self.device)))
            _restore_optimizer(self.disc_opt,
                               _checkpoint_tensors(folder / "disc_optim.safetensors"),
                               state["disc_param_groups"])
        return True

    def _trim_log(self, step: int) -> None:
        """Drop the step log's lines of steps from ``step`` on (and a line cut by a kill):
        the resumed run logs them again."""
        path = self.out / "log.jsonl"
        try:
            lines = path.read_text().splitlines(keepends=True)
        except FileNotFoundError:
            return
        keep = []
        for line in lines:
            try:
                logged = int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                continue
            if logged < step:
                keep.append(line if line.endswith("\n") else line + "\n")
        if keep != lines:
            atomic_write(path, "".join(keep))

    # -- one step --------------------------------------------------------------------------

    def train_step(self) -> StepLog:
        cfg = self.cfg
        stage = cfg.stage_at(self.step)
        self._enter_stage(stage)
        assert self.opt is not None
        image = stage == "image"
        frames = 1 if image else cfg.frames
        batch = cfg.image_batch if image else cfg.video_batch
        crop = cfg.image_crop if image else cfg.video_crop
        t0 = time.perf_counter()
        x = self.stage_data[stage].batch(seed=cfg.seed, rank=self.rank, step=self.step,
                                         batch_size=batch, frames=frames, crop=crop)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.rank * 7919 + self.step)
        # drawn on the CPU: the same on every device
        eps = torch.randn(latent_shape(cfg.z_dim, frames, crop, crop, batch), generator=g)
        x = x.to(self.device, non_blocking=True)
        eps = eps.to(self.device, non_blocking=True)
        lr = cfg.lr_at(self.step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        ctx = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
        with ctx:
            rec, mu, logvar = self.objective(x, eps)
        rec = rec.float()
        k = cfg.z_dim // 2
        if image:  # the keyframe half only: an image VAE of half the latent width
            mu, logvar = mu[:, :k], logvar[:, :k]
        rec_loss = charbonnier(rec, x) if cfg.loss == "charbonnier" else (rec - x).abs().mean()
        kl = kl_divergence(mu, logvar)
        loss = rec_loss + cfg.kl_weight * kl
        extra: dict[str, float] = {}
        if cfg.ssim_weight > 0:
            ssim = ssim_per_frame(rec, x).mean()
            loss = loss + cfg.ssim_weight * (1 - ssim)
            extra["ssim"] = float(ssim.detach())
        use_gan = (self.disc is not None and not image
                   and self.step - cfg.image_steps >= cfg.adv_start)
        if use_gan and self.disc is not None:
            g_adv = -self.disc(rec).mean()
            loss = loss + cfg.adv_weight * g_adv
            extra["g_adv"] = float(g_adv)
        self._check_finite(loss, lr)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if image and not cfg.init_weights:
            self.mask.zero_grads()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.vae.parameters(), cfg.grad_clip)
        self.opt.step()
        self._update_ema()
        if use_gan and self.disc is not None and self.disc_opt is not None:
            d_loss = (F.relu(1 - self.disc(x)).mean() + F.relu(1 + self.disc(rec.detach())).mean())
            self.disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            if self.world > 1:
                for p in self.disc.parameters():
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad /= self.world
            self.disc_opt.step()
            extra["d_loss"] = float(d_loss)
        dt = time.perf_counter() - t0
        psnr = float(psnr_per_frame(rec.detach(), x).mean())
        log = StepLog(self.step, stage, loss.item(), rec_loss.item(), kl.item(), psnr, lr,
                      batch * frames * self.world / dt, extra)
        self.step += 1
        return log

    def _check_finite(self, loss: Tensor, lr: float) -> None:
        """Stop before a non-finite loss reaches the weights (every rank stops together: one
        that stopped alone would leave the others waiting in the gradient all-reduce)."""
        bad = (~torch.isfinite(loss.detach())).float()
        if self.world > 1:
            dist.all_reduce(bad)
        if bad.item():
            newest = newest_checkpoint(self.out)
            kept = (f"the checkpoint of step {newest[1]['step']} is kept" if newest
                    else "no checkpoint was written")
            raise Diverged(f"the loss is not a finite number at step {self.step} (lr {lr:g}): "
                           f"training diverged; {kept}. Lower --lr (or --kl-weight, "
                           "--adv-weight) and run again")

    def _model_of(self, weights: dict[str, Tensor], cfg: IVVAEConfig | None = None) -> IVVAE:
        """A CPU model holding ``weights`` (state-dict names)."""
        model = IVVAE(cfg or self.vae.cfg)
        model.load_state_dict({k: v.detach().cpu() for k, v in weights.items()})
        return model

    def _update_ema(self) -> None:
        if self.cfg.ema_decay <= 0:
            return
        weights = self.vae.state_dict()
        if self.ema is None:
            self.ema = {k: v.detach().float().clone() for k, v in weights.items()}
            return
        decay = self.cfg.ema_decay_at(self.step)
        with torch.no_grad():
            for name, value in weights.items():
                self.ema[name].lerp_(value.float(), 1 - decay)

    # -- the loop --------------------------------------------------------------------------

    def fit(self, *, progress: bool = True, max_steps: int | None = None) -> None:
        """Train until the configured total (or ``max_steps`` more steps), checkpointing."""
        from tqdm import tqdm

        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        end = cfg.total_steps if max_steps is None else min(cfg.total_steps,
                                                            self.step + max_steps)
        bar = tqdm(total=end, initial=self.step, disable=not progress or self.rank != 0,
                   unit="step", dynamic_ncols=True)
        log_path = self.out / "log.jsonl"
        with bar, self._deferred_interrupt() as asked:
            while self.step < end:
                log = self.train_step()
                bar.update(1)
                bar.set_postfix(stage=log.stage, loss=f"{log.loss:.4f}", psnr=f"{log.psnr:.2f}",
                                fps=f"{log.frames_per_s:.1f}")
                if self.rank == 0 and (log.step % cfg.log_every == 0 or self.step == end):
                    with log_path.open("a") as f:
                        f.write(json.dumps(dataclasses.asdict(log)) + "\n")
                if self.on_log is not None:
                    self.on_log(log)
                saved = self.step % cfg.save_every == 0 or self.step == end
                if saved:
                    self.save()
                    if self.world > 1:
                        dist.barrier()
                if asked and self.step < end:  # after the last step: the run is done
                    if not saved:
                        self.save()
                    raise Interrupted(self.step)

    @contextlib.contextmanager
    def _deferred_interrupt(self) -> Iterator[list[int]]:
        """While training, a first Ctrl-C asks to stop after the running step (the list it
        yields is then not empty), and a second stops at once. A step cut midway leaves the
        weights updated and the optimizer not, or some parameters and not others: only
        between steps is the state one a checkpoint can hold. Under DDP every rank would have
        to stop after the same step: there Ctrl-C stops at once, as before."""
        asked: list[int] = []
        if (self.world > 1 or threading.current_thread() is not threading.main_thread()
                or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
            # Also where SIGINT is ignored (nohup, a script's background job) or handled by
            # the program that runs this: its choice stands.
            yield asked
            return

        def interrupt(signum: int, frame: Any) -> None:
            if asked:
                raise KeyboardInterrupt
            asked.append(signum)
            print("\nivvae train: stopping after the running step, to save a checkpoint "
                  "there (interrupt again to stop at once, keeping the last one)",
                  file=sys.stderr)

        before = signal.signal(signal.SIGINT, interrupt)
        try:
            yield asked
        finally:
            signal.signal(signal.SIGINT, before)

    def export_model(self, path: str | os.PathLike[str], *, calibration_batches: int = 8,
                     name: str = "") -> IVVAEConfig:
        """Write inference weights with scale/shift factors fitted on training data.

        The weights are the moving average when ``ema_decay`` is set, else the last step's.
        ``shift`` is the mean of ``mu`` and ``scale`` 1 / its standard deviation, so the
        diffusion latents are roughly zero-mean and unit-variance (as the official ones).
        """
        cfg = self.cfg
        weights = self.ema if self.ema is not None else self.vae.state_dict()
        calibrate = self._model_of(weights).eval().requires_grad_(False).to(self.device)
        mus = []
        # Video windows, or single frames for a run of stage 1 only (its clips may be
        # shorter than a video window).
        data, frames, crop = ((self.stage_data["video"], cfg.frames, cfg.video_crop)
                              if "video" in self.stage_data
                              else (self.stage_data["image"], 1, cfg.image_crop))
        with torch.no_grad():
            for i in range(calibration_batches):
                x = data.batch(seed=cfg.seed + 1, rank=0, step=i, batch_size=cfg.video_batch,
                               frames=frames, crop=crop)
                mu, _, _ = calibrate.encode_step(x.to(self.device), None)
                mus.append(mu.flatten().float().cpu())
        del calibrate
        allmu = torch.cat(mus)
        shift = float(allmu.mean())
        scale = float(1.0 / allmu.std().clamp_min(1e-6))
        if not (math.isfinite(shift) and math.isfinite(scale)):
            raise Diverged("the model's latents are not finite numbers: there is nothing "
                           "worth exporting (train again with a lower --lr)")
        model_cfg = self.vae.cfg.with_factors(round(scale, 6), round(shift, 6))
        frozen = self._model_of(weights, model_cfg)
        frozen.name = name or _export_name(path, cfg)
        save_safetensors(frozen, path, {"training_steps": str(self.step),
                                        "training_config": json.dumps(dataclasses.asdict(cfg))})
        return model_cfg

