"""Training recipe: loss falls, exact resume, the KTC stage-1 mask, DDP on 2 CPU processes."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from ivvae.model import load_model
from ivvae.train.config import TrainConfig
from ivvae.train.data import ClipDataset, synthetic_clips
from ivvae.train.ktc import KeyframeMask
from ivvae.train.trainer import Trainer
from tests import media


def tiny_cfg(out: Path, **kw: object) -> TrainConfig:
    base = dict(out=str(out), z_dim=4, dim=4, image_steps=6, video_steps=30, image_batch=4,
                image_crop=16, video_batch=2, video_crop=16, frames=5, lr=3e-3,
                warmup_steps=2, save_every=1000, log_every=1)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    """Tests here pin one thread for exact losses; later modules get the count back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def clips() -> ClipDataset:
    return synthetic_clips(3, 24, 32, seed=1)


def _eval_l1(tr: Trainer, x: torch.Tensor) -> float:
    with torch.no_grad():
        mu, _, _ = tr.vae.encode_step(x, None)
        rec, _ = tr.vae.decode_step(mu, None)
    return float((rec - x).abs().mean())


def test_loss_falls(tmp_path: Path, clips: ClipDataset) -> None:
    torch.set_num_threads(1)
    tr = Trainer(tiny_cfg(tmp_path, video_steps=40), dataset=clips)
    held_out = clips.batch(seed=99, rank=0, step=0, batch_size=4, frames=5, crop=16)
    before = _eval_l1(tr, held_out)
    logs = [tr.train_step() for _ in range(46)]
    assert [entry.stage for entry in logs[:7]] == ["image"] * 6 + ["video"]
    after = _eval_l1(tr, held_out)
    assert after < 0.93 * before, (before, after)
    assert all(math.isfinite(entry.loss) for entry in logs)


def test_resume_is_bit_identical(tmp_path: Path, clips: ClipDataset) -> None:
    torch.set_num_threads(1)
    a = Trainer(tiny_cfg(tmp_path / "a", save_every=8), dataset=clips)
    a.fit(progress=False, max_steps=8)  # crosses into the video stage at step 6
    reference = [a.train_step().loss for _ in range(2)]

    b = Trainer(tiny_cfg(tmp_path / "a", save_every=8), dataset=clips)
    assert b.resume()
    assert b.step == 8
    resumed = [b.train_step().loss for _ in range(2)]
    assert resumed == reference  # bit for bit

    state = json.loads((tmp_path / "a" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 8 and state["stage"] == "video"
    with pytest.raises(ValueError, match=r"other settings \(lr: 0.003 then, 1.0 now\)"):
        Trainer(tiny_cfg(tmp_path / "a", lr=1.0), dataset=clips).resume()


def test_stage1_is_an_image_vae_of_the_keyframe_half(tmp_path: Path, clips: ClipDataset) -> None:
    tr = Trainer(tiny_cfg(tmp_path), dataset=clips)
    for _ in range(3):
        tr.train_step()
    vae = tr.vae
    for p, idx in KeyframeMask(vae).blocks:
        assert torch.count_nonzero(p[idx]) == 0
    vae.eval()
    x = torch.rand(1, 3, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        mu, _, _ = vae.encode_step(x, None)
        rec, _ = vae.decode_step(mu, None)
        # scramble everything the 3D half computes: keyframe outputs must not move
        k = vae.cfg.half_z
        mu2 = mu.clone()
        mu2[:, k:] = torch.randn_like(mu2[:, k:]) * 10
        rec2, _ = vae.decode_step(mu2, None)
        x2 = x.clone()
        assert torch.equal(rec, rec2)
        for name, p in vae.encoder.named_parameters():
            if name.endswith("conv_3d.weight") and "stem" not in name:
                p.add_(torch.randn_like(p))
        mu3, _, _ = vae.encode_step(x2, None)
    assert torch.allclose(mu3[:, :k], mu[:, :k], atol=1e-6)
    assert not torch.allclose(mu3[:, k:], mu[:, k:], atol=1e-3)


def test_export_writes_loadable_weights_with_fitted_factors(
    tmp_path: Path, clips: ClipDataset
) -> None:
    tr = Trainer(tiny_cfg(tmp_path), dataset=clips)
    for _ in range(8):
        tr.train_step()
    path = tmp_path / "model.safetensors"
    cfg = tr.export_model(path, calibration_batches=2)
    model = load_model(path)
    assert model.cfg == cfg
    assert cfg.scale_factor > 0 and cfg.scale_factor != 1.0
    x = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    assert model.decode(model.encode(x)).shape == x.shape
    # Named as its file (two runs' exports shared ivvae_z4_dim4_trained), unless the file's
    # name is none a model may have.
    assert model.name == "model"
    tr.export_model(tmp_path / "faces v2.safetensors", calibration_batches=1)
    assert load_model(tmp_path / "faces v2.safetensors").name == "ivvae_z4_dim4_trained"


def test_a_fine_tune_is_not_labelled_as_the_model_it_started_from(
        tmp_path: Path, clips: ClipDataset) -> None:
    # Its checkpoints carried the init weights' model_name: eval, and latents encoded with
    # them, said "ivvae_z16_dim16_bundled" of a half fine-tuned model.
    from ivvae.model import IVVAE, IVVAEConfig
    from ivvae.model.checkpoint import save_safetensors

    start = IVVAE(IVVAEConfig(z_dim=4, dim=4))
    start.name = "tiny_bundled"
    save_safetensors(start, tmp_path / "start.safetensors")
    tr = Trainer(tiny_cfg(tmp_path / "run", init_weights=str(tmp_path / "start.safetensors")),
                 dataset=clips)
    tr.train_step()
    tr.save()
    name = load_model(tmp_path / "run" / "checkpoint" / "model.safetensors").name
    assert name == "ivvae_z4_dim4"


@pytest.mark.slow
def test_ddp_two_process_gloo_smoke(tmp_path: Path) -> None:
    data = tmp_path / "clips"
    data.mkdir()
    for i in range(2):
        media.make_video(data / f"clip{i}.mp4", frames=12 + i, width=32, height=32)
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "ivvae.cli", "train", "--out", str(out),
        "--data", str(data), "--z-dim", "4", "--dim", "4", "--image-steps", "2",
        "--video-steps", "2", "--image-batch", "2", "--image-crop", "16", "--video-batch", "1",
        "--video-crop", "16", "--frames", "5", "--save-every", "4",
        "--log-every", "1", "--threads", "1", "--no-progress",
        "--export", str(tmp_path / "ddp.safetensors"),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # A new session, so a hang kills torchrun *and* its workers (no stray processes).
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4
    lines = (out / "log.jsonl").read_text().splitlines()
    assert len(lines) == 4  # rank 0 logs each step once
    load_model(tmp_path / "ddp.safetensors")


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="1 \\+ 4N"):
        TrainConfig(out="x", frames=6)
    cfg = TrainConfig(out="x", image_steps=10, video_steps=10, warmup_steps=2)
    assert cfg.stage_at(9) == "image" and cfg.stage_at(10) == "video"
    assert cfg.lr_at(0) < cfg.lr_at(1) <= cfg.lr
    assert dataclasses.replace(cfg, lr=1.0).lr_at(11) == 1.0
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="ema_decay"):
            TrainConfig(out="x", ema_decay=bad)
    ema = TrainConfig(out="x", ema_decay=0.999)
    assert ema.ema_decay_at(0) == pytest.approx(0.1) and ema.ema_decay_at(10**6) == 0.999


def test_ema_is_the_average_that_is_exported_and_resumed(tmp_path: Path,
                                                        clips: ClipDataset) -> None:
    torch.set_num_threads(1)
    cfg = tiny_cfg(tmp_path / "a", image_steps=2, video_steps=12, ema_decay=0.9, save_every=6)
    a = Trainer(cfg, dataset=clips)
    a.fit(progress=False, max_steps=6)
    assert a.ema is not None
    before = {k: v.clone() for k, v in a.ema.items()}
    a.train_step()
    after_step = {k: v.detach().float().clone() for k, v in a.vae.state_dict().items()}
    decay = cfg.ema_decay_at(6)
    for k, v in a.ema.items():
        torch.testing.assert_close(v, decay * before[k] + (1 - decay) * after_step[k])
    a.train_step()
    # the average lags the weights; the export is the average, not the last step
    assert any(not torch.equal(a.ema[k], after_step[k]) for k in a.ema)
    path = tmp_path / "ema.safetensors"
    a.export_model(path, calibration_batches=2)
    exported = load_model(path).state_dict()
    for k, v in a.ema.items():
        assert torch.equal(exported[k], v), k

    # the checkpoint holds the average at step 6 as a weights file, as it holds the model
    saved = load_model(tmp_path / "a" / "checkpoint" / "ema.safetensors").state_dict()
    for k, v in before.items():
        assert torch.equal(saved[k], v), k
    b = Trainer(cfg, dataset=clips)  # resumes at step 6 with the saved average
    assert b.resume() and b.step == 6
    b.train_step()
    b.train_step()
    assert b.ema is not None
    for k, v in a.ema.items():
        assert torch.equal(b.ema[k], v), k


def test_a_checkpoint_from_before_an_option_existed_resumes(tmp_path: Path,
                                                            clips: ClipDataset) -> None:
    cfg = tiny_cfg(tmp_path, image_steps=2, video_steps=0, save_every=2)
    Trainer(cfg, dataset=clips).fit(progress=False)
    state_file = tmp_path / "checkpoint" / "state.json"
    state = json.loads(state_file.read_text())
    # written by a version without these options: ema_decay (free on resume) and one that
    # is not free, which then counts as its default (the value cfg has)
    del state["config"]["ema_decay"], state["config"]["ssim_weight"]
    state_file.write_text(json.dumps(state))
    assert Trainer(cfg, dataset=clips).resume()
    with pytest.raises(ValueError, match="ssim_weight"):
        Trainer(dataclasses.replace(cfg, ssim_weight=0.5), dataset=clips).resume()
    with pytest.raises(ValueError, match="lr"):
        Trainer(dataclasses.replace(cfg, lr=1.0), dataset=clips).resume()


def test_a_moving_average_switched_on_in_a_resumed_run_starts_there(
    tmp_path: Path, clips: ClipDataset
) -> None:
    cfg = tiny_cfg(tmp_path, image_steps=2, video_steps=4, save_every=2)
    Trainer(cfg, dataset=clips).fit(progress=False, max_steps=2)
    tr = Trainer(dataclasses.replace(cfg, ema_decay=0.9), dataset=clips)
    assert tr.resume() and tr.step == 2 and tr.ema is None
    tr.train_step()  # the average starts from the weights after this step
    assert tr.ema is not None
    for k, v in tr.vae.state_dict().items():
        assert torch.equal(tr.ema[k], v.float()), k


def test_device_resolution() -> None:
    from ivvae.train.trainer import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    auto = resolve_device("auto")
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu")
    # a bare "cuda" gets this process's index (LOCAL_RANK under torchrun)
    os.environ["LOCAL_RANK"] = "3"
    try:
        assert resolve_device("cuda") == torch.device("cuda", 3)
    finally:
        del os.environ["LOCAL_RANK"]


def test_resume_on_another_device_setting_is_allowed(tmp_path: Path, clips: ClipDataset) -> None:
    tr = Trainer(tiny_cfg(tmp_path, image_steps=2, video_steps=0), dataset=clips)
    tr.fit(progress=False)
    again = Trainer(tiny_cfg(tmp_path, image_steps=2, video_steps=0, device="cpu"),
                    dataset=clips)
    assert again.resume() and again.step == 2
    with pytest.raises(ValueError, match="lr"):
        Trainer(tiny_cfg(tmp_path, image_steps=2, video_steps=0, lr=1.0),
                dataset=clips).resume()


def test_extra_scales_add_downscaled_copies(tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    media.make_video(path, frames=6, width=64, height=48)
    ds = ClipDataset.from_paths([path], max_side=256, extra_scales=(24, 100))
    # 100 is not smaller than the clip: no copy; 24 is
    assert ds.names == [str(path), f"{path}@24"]
    assert ds.clips[0].shape == (6, 48, 64, 3)
    assert ds.clips[1].shape == (6, 24, 32, 3)


def test_cli_parses_integer_tuples(tmp_path: Path) -> None:
    from ivvae.cli import build_parser

    args = build_parser().parse_args(["train", "--out", str(tmp_path), "--extra-scales", "144",
                                      "96", "--data", "a.mp4", "b.mp4"])
    assert args.extra_scales == [144, 96] and args.data == ["a.mp4", "b.mp4"]


def test_weights_and_checkpoints_are_readable_by_others(tmp_path: Path,
                                                        clips: ClipDataset) -> None:
    old = os.umask(0o022)
    try:
        tr = Trainer(tiny_cfg(tmp_path), dataset=clips)
        tr.train_step()
        tr.save()
        tr.export_model(tmp_path / "model.safetensors", calibration_batches=1)
    finally:
        os.umask(old)
    written = [*(tmp_path / "checkpoint").iterdir(), tmp_path / "model.safetensors"]
    assert {p.name for p in written} >= {"model.safetensors", "optim.safetensors",
                                         "state.json"}
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in written}
    assert set(modes.values()) == {"0o644"}, modes


def test_a_warmup_longer_than_a_stage_is_warned_about(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    assert tiny_cfg(tmp_path).warnings() == []
    cfg = tiny_cfg(tmp_path, warmup_steps=6)  # image_steps=6, video_steps=30
    [warning] = cfg.warnings()
    assert "image stage (6 steps)" in warning
    from ivvae.cli import main

    clip = tmp_path / "clip.mp4"
    media.make_video(clip, frames=9, width=32, height=32)
    assert main(["train", "--out", str(tmp_path / "run"), "--data", str(clip),
                 "--image-steps", "0", "--video-steps", "50", "--warmup-steps", "100",
                 "--max-steps", "0", "--z-dim", "4", "--dim", "4", "--video-crop", "16",
                 "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "warning: warmup_steps=100" in err and "video stage (50 steps)" in err


@pytest.mark.parametrize("emulated", [True, False])
def test_bf16_on_a_cpu_that_emulates_it_is_warned_of(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        emulated: bool) -> None:
    # Two steps took 228 s against 67 s in float32 on an AVX2 machine, in silence.
    from ivvae.cli import main
    from ivvae.model import precision

    monkeypatch.setattr(precision, "cpu_bfloat16_is_emulated", lambda: emulated)
    clip = tmp_path / "clip.mp4"
    media.make_video(clip, frames=9, width=32, height=32)
    assert main(["train", "--out", str(tmp_path / "run"), "--data", str(clip), "--bf16",
                 "--image-steps", "0", "--video-steps", "5", "--max-steps", "0",
                 "--z-dim", "4", "--dim", "4", "--video-crop", "16", "--no-progress"]) == 0
    assert ("--bf16 on a CPU that emulates bfloat16" in capsys.readouterr().err) is emulated


def _trained(out: Path, clips: ClipDataset, steps: int) -> Trainer:
    tr = Trainer(tiny_cfg(out, image_steps=2, video_steps=6, save_every=2), dataset=clips)
    tr.fit(progress=False, max_steps=steps)
    return tr


@pytest.mark.parametrize("new_is_whole", [False, True])
def test_a_save_killed_between_its_renames_resumes_from_the_newest_whole_checkpoint(
        tmp_path: Path, clips: ClipDataset, new_is_whole: bool) -> None:
    import shutil

    _trained(tmp_path, clips, 4)  # checkpoint of step 4
    # The kill: the last checkpoint was moved aside, the new one not yet moved in.
    ckpt, old, tmp = (tmp_path / n for n in ("checkpoint", "checkpoint.old", "checkpoint.tmp"))
    ckpt.rename(old)
    shutil.copytree(old, tmp)
    state = json.loads((tmp / "state.json").read_text())
    if new_is_whole:
        (tmp / "state.json").write_text(json.dumps({**state, "step": 6}))
    else:  # killed while writing it: state.json is written last
        (tmp / "state.json").write_text(json.dumps(state)[:20])
    again = Trainer(tiny_cfg(tmp_path, image_steps=2, video_steps=6, save_every=2),
                    dataset=clips)
    assert again.resume()
    assert again.step == (6 if new_is_whole else 4)
    again.fit(progress=False)  # and it saves over it as usual
    assert json.loads((ckpt / "state.json").read_text())["step"] == 8


def test_a_diverged_run_stops_and_keeps_its_last_checkpoint(tmp_path: Path,
                                                            clips: ClipDataset) -> None:
    from ivvae.train.trainer import Diverged

    tr = _trained(tmp_path, clips, 2)
    before = (tmp_path / "checkpoint" / "model.safetensors").read_bytes()
    with torch.no_grad():
        next(tr.vae.parameters()).fill_(float("nan"))
    with pytest.raises(Diverged, match=r"finite number at step 2.*checkpoint of step 2 is kept"):
        tr.fit(progress=False)
    with pytest.raises(Diverged, match="NaN or infinite"):
        tr.save()
    tr.rank = 1  # every rank stops (one alone would leave the rest at the barrier)
    with pytest.raises(Diverged, match="NaN or infinite"):
        tr.save()
    assert (tmp_path / "checkpoint" / "model.safetensors").read_bytes() == before
    assert tr.step == 2  # the step that saw the NaN was not taken


def test_unusable_option_values_are_refused_by_name() -> None:
    for field, value in (("save_every", 0), ("log_every", 0), ("image_batch", 0),
                         ("max_clip_frames", 0), ("max_side", 0), ("image_steps", -5),
                         ("lr", float("inf")), ("kl_weight", float("nan")), ("lr", 0.0)):
        with pytest.raises(ValueError, match=field):
            TrainConfig(out="x", **{field: value})
    with pytest.raises(ValueError, match="extra_scales"):
        TrainConfig(out="x", extra_scales=(0,))
    with pytest.raises(ValueError, match="at least 1"):
        TrainConfig(out="x", image_steps=0, video_steps=0)


def test_clips_too_small_or_unreadable_are_left_out_by_name(tmp_path: Path) -> None:
    good, short, tiny = (tmp_path / n for n in ("good.mp4", "short.mp4", "tiny.mp4"))
    media.make_video(good, frames=9, width=32, height=32)
    media.make_video(short, frames=3, width=32, height=32)
    media.make_video(tiny, frames=9, width=8, height=8)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 100)
    cfg = tiny_cfg(tmp_path / "run", data=tuple(map(str, (good, short, tiny, broken))))
    tr = Trainer(cfg)
    # The short clip still serves stage 1 (single frames); the tiny one no stage.
    assert tr.data.names == [str(good), str(short)]
    assert tr.stage_data["video"].names == [str(good)]
    assert [line.split(":")[0] for line in tr.skipped] == [str(broken), str(tiny), str(short),
                                                           str(tiny)]
    assert ("3 frames of 32x32 is smaller than the 5 frames of 16x16 a batch cuts out (left "
            "out of the video stage)") in tr.skipped[2]
    with pytest.raises(ValueError, match=r"usable in the video stage: .*short\.mp4"):
        Trainer(tiny_cfg(tmp_path / "run2", data=(str(short),)))
    images_only = Trainer(tiny_cfg(tmp_path / "run3", data=(str(short),), video_steps=0))
    images_only.train_step()  # and its export calibrates on single frames
    images_only.export_model(tmp_path / "m.safetensors", calibration_batches=1)
    with pytest.raises(ValueError, match=r"broken\.mp4: "):  # without a list: an error naming it
        ClipDataset.from_paths([broken])


def test_a_list_file_is_read_relative_to_its_folder(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from ivvae.train.data import expand_sources

    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "train.txt").write_text("# clips\n../a.mp4\n\n/abs/b.mp4\n")
    monkeypatch.chdir("/")
    assert expand_sources([tmp_path / "lists" / "train.txt"]) == [
        tmp_path / "lists" / "../a.mp4", Path("/abs/b.mp4")]


def _cli_train(out: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "ivvae.cli", "train", "--out", str(out), "--z-dim", "4",
           "--dim", "4", "--image-steps", "1", "--video-steps", "1", "--image-batch", "1",
           "--video-batch", "1", "--image-crop", "16", "--video-crop", "16", "--frames", "5",
           "--warmup-steps", "0", "--threads", "1", "--no-progress", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd)


def test_cli_export_only_needs_a_checkpoint_and_data_paths_are_remembered_as_files(
        tmp_path: Path) -> None:
    clip = tmp_path / "d" / "clip.mp4"
    clip.parent.mkdir()
    media.make_video(clip, frames=9, width=32, height=32)
    run = tmp_path / "run"
    refused = _cli_train(run, "--data", str(clip), "--export-only", "--export",
                         str(tmp_path / "m.safetensors"))
    assert refused.returncode == 2 and "no checkpoint in" in refused.stderr, refused.stderr
    assert not (tmp_path / "m.safetensors").exists()
    refused = _cli_train(run, "--data", str(clip), "--export-only")
    assert refused.returncode == 2 and "needs --export" in refused.stderr, refused.stderr
    done = _cli_train(run, "--data", "d/clip.mp4", "--max-steps", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    # The same file spelled another way resumes; another file with the same spelling does not.
    again = _cli_train(run, "--data", "./d/../d/clip.mp4", cwd=tmp_path)
    assert again.returncode == 0 and "resumed at step 1" in again.stderr, again.stderr
    (tmp_path / "x" / "d").mkdir(parents=True)
    media.make_video(tmp_path / "x" / "d" / "clip.mp4", frames=9, width=32, height=32)
    other = _cli_train(run, "--data", "d/clip.mp4", cwd=tmp_path / "x")
    assert other.returncode == 2 and "other settings (data:" in other.stderr, other.stderr
    # Exporting takes the run's own settings: only where it is, and where to write.
    export = subprocess.run(
        [sys.executable, "-m", "ivvae.cli", "train", "--out", str(run), "--export-only",
         "--export", str(tmp_path / "m.safetensors"), "--threads", "1"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path / "x")
    assert export.returncode == 0, export.stderr
    assert "exporting the checkpoint of step 2 of 2 in" in export.stderr, export.stderr
    assert "training resumed" not in export.stderr
    assert load_model(tmp_path / "m.safetensors").cfg.z_dim == 4


def test_the_newest_whole_checkpoint_wins_and_an_export_moves_nothing(
        tmp_path: Path, clips: ClipDataset) -> None:
    import shutil

    from ivvae.train.trainer import newest_checkpoint

    _trained(tmp_path, clips, 4)
    ckpt, tmp = tmp_path / "checkpoint", tmp_path / "checkpoint.tmp"
    # Killed after the new checkpoint was whole, before either rename.
    shutil.copytree(ckpt, tmp)
    state = json.loads((tmp / "state.json").read_text())
    (tmp / "state.json").write_text(json.dumps({**state, "step": 6}))
    found = newest_checkpoint(tmp_path)
    assert found is not None and found[0] == tmp and found[1]["step"] == 6
    reader = Trainer(tiny_cfg(tmp_path, image_steps=2, video_steps=6, save_every=2),
                     dataset=clips)
    assert reader.resume(recover=False) and reader.step == 6
    assert tmp.is_dir() and json.loads((ckpt / "state.json").read_text())["step"] == 4
    again = Trainer(tiny_cfg(tmp_path, image_steps=2, video_steps=6, save_every=2),
                    dataset=clips)
    assert again.resume() and again.step == 6 and not tmp.exists()
    assert json.loads((ckpt / "state.json").read_text())["step"] == 6


def test_a_second_run_into_a_busy_folder_is_refused(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from ivvae.cli import main
    from ivvae.train.trainer import run_lock

    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--data", str(tmp_path / "none.mp4"), "--no-progress"]
    with run_lock(out):  # a run holds the folder (a lock is per open file, even in-process)
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"{out} is in use by another ivvae train run (pid {os.getpid()})" in err, err
        with pytest.raises(ValueError, match="in use"), run_lock(out):
            pass
    with run_lock(out):  # released with its run
        pass
    # --export-only reads beside the run that owns the folder: never refused for the lock
    with run_lock(out):
        assert main([*args, "--export-only", "--export", str(tmp_path / "m.safetensors")]) == 2
        assert "no checkpoint in" in capsys.readouterr().err


def test_an_export_path_that_cannot_be_written_is_refused_before_training(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ivvae.cli import main

    clip = tmp_path / "clip.mp4"
    media.make_video(clip, frames=9, width=32, height=32)
    base = ["train", "--out", str(tmp_path / "run"), "--data", str(clip), "--no-progress",
            "--z-dim", "4", "--dim", "4", "--image-steps", "0", "--video-crop", "16"]
    missing = tmp_path / "no_such_dir" / "m.safetensors"
    assert main([*base, "--export", str(missing)]) == 2
    assert f"--export {missing}: its folder {missing.parent} does not exist" in (
        capsys.readouterr().err)
    assert main([*base, "--export", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert not (tmp_path / "run" / "log.jsonl").exists()  # not a step was trained
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "ro"
        locked.mkdir(mode=0o500)
        assert main([*base, "--export", str(locked / "m.safetensors")]) == 2
        assert "is not writable" in capsys.readouterr().err


def test_a_resume_on_other_data_is_refused_saying_what_changed(tmp_path: Path,
                                                              clips: ClipDataset) -> None:
    cfg = tiny_cfg(tmp_path, image_steps=2, video_steps=2, save_every=2)
    Trainer(cfg, dataset=clips).fit(progress=False, max_steps=2)
    assert Trainer(cfg, dataset=clips).resume()  # the same data resume
    fewer = ClipDataset(clips.clips[:2], clips.names[:2])
    with pytest.raises(ValueError, match=r"1 clip\(s\) removed \(synthetic_2\); 3 clips then, "
                                         r"2 now\. .*another --out \(--init-weights "):
        Trainer(cfg, dataset=fewer).resume()
    other = synthetic_clips(4, 20, 32, seed=1)  # same names, one more, shorter clips
    with pytest.raises(ValueError, match=r"1 clip\(s\) added \(synthetic_3\); 3 clip\(s\) "
                                         r"changed \(synthetic_0, synthetic_1, synthetic_2\)"):
        Trainer(cfg, dataset=other).resume()
    # An export reads the checkpoint and fits its factors on the data as they are now.
    assert Trainer(cfg, dataset=fewer).resume(recover=False)


def test_a_replaced_file_of_the_same_shape_changes_the_listing(tmp_path: Path) -> None:
    clip = tmp_path / "clip.mp4"
    media.make_video(clip, frames=6, width=32, height=32)
    before = ClipDataset.from_paths([clip]).listing()
    media.make_video(clip, frames=6, width=32, height=32, pattern="gradient")
    after = ClipDataset.from_paths([clip]).listing()
    assert before[str(clip)].startswith("6 frames of 32x32, ") and before != after


def test_init_weights_of_another_model_are_refused_with_both_sizes(
        tmp_path: Path, clips: ClipDataset) -> None:
    from ivvae.model import IVVAE, IVVAEConfig
    from ivvae.model.checkpoint import save_safetensors

    weights = tmp_path / "w.safetensors"
    save_safetensors(IVVAE(IVVAEConfig(z_dim=4, dim=4, num_res_blocks=2)), weights)
    Trainer(tiny_cfg(tmp_path / "a", init_weights=str(weights)), dataset=clips)  # a match
    # num_res_blocks: the 2-block model trained while the run recorded 3
    for other in ({"num_res_blocks": 3}, {"dim": 8}):
        with pytest.raises(ValueError, match=(
                rf"--init-weights {weights} is a model of z_dim 4, dim 4, num_res_blocks 2; "
                r"this run is set for z_dim 4, dim \d, num_res_blocks \d: pass --z-dim 4 "
                r"--dim 4 --num-res-blocks 2")):
            Trainer(tiny_cfg(tmp_path / "b", init_weights=str(weights), **other),
                    dataset=clips)


def test_an_interrupt_saves_the_step_it_ends_and_resumes_from_it_bit_for_bit(
        tmp_path: Path, clips: ClipDataset) -> None:
    from ivvae.train.trainer import Interrupted, StepLog

    torch.set_num_threads(1)
    cfg = tiny_cfg(tmp_path / "a", image_steps=2, video_steps=6, save_every=100)
    reference = Trainer(cfg, dataset=clips)
    losses = [reference.train_step().loss for _ in range(6)]

    def ctrl_c(log: StepLog) -> None:
        if log.step == 2:  # as a signal comes: in the middle of a step's work
            os.kill(os.getpid(), signal.SIGINT)

    a = Trainer(cfg, dataset=clips, on_log=ctrl_c)
    with pytest.raises(Interrupted) as stopped:
        a.fit(progress=False)
    assert stopped.value.step == 3  # step 2 was finished, and saved after it
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert json.loads((tmp_path / "a" / "checkpoint" / "state.json").read_text())["step"] == 3
    b = Trainer(cfg, dataset=clips)
    assert b.resume() and b.step == 3
    assert [b.train_step().loss for _ in range(3)] == losses[3:]  # bit for bit


def test_an_interrupt_in_the_last_step_ends_the_run_and_an_ignored_one_stays_ignored(
        tmp_path: Path, clips: ClipDataset) -> None:
    from ivvae.train.trainer import StepLog

    torch.set_num_threads(1)
    cfg = tiny_cfg(tmp_path / "a", image_steps=2, video_steps=2, save_every=100)

    def ctrl_c_at(step: int) -> Callable[[StepLog], None]:
        def on_log(log: StepLog) -> None:
            if log.step == step:
                os.kill(os.getpid(), signal.SIGINT)
        return on_log

    # In the last step: the run is whole, and the export that follows it must not be lost.
    last = Trainer(cfg, dataset=clips, on_log=ctrl_c_at(3))
    last.fit(progress=False)
    assert last.step == 4
    # Where SIGINT is ignored (nohup, a script's background job), it stays ignored.
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ignored = Trainer(tiny_cfg(tmp_path / "b", image_steps=2, video_steps=2,
                                   save_every=100), dataset=clips, on_log=ctrl_c_at(1))
        ignored.fit(progress=False)
        assert ignored.step == 4 and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_resume_drops_the_log_lines_past_its_checkpoint(tmp_path: Path,
                                                         clips: ClipDataset) -> None:
    _trained(tmp_path, clips, 2)  # checkpoint of step 2, log lines of steps 0, 1
    log = tmp_path / "log.jsonl"
    # then it logged step 2 and was killed while writing step 3's line
    log.write_text(log.read_text() + '{"step": 2, "loss": 0.5}\n{"step": 3, "lo')
    again = Trainer(tiny_cfg(tmp_path, image_steps=2, video_steps=6, save_every=2),
                    dataset=clips)
    assert again.resume() and again.step == 2
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [0, 1]
    again.fit(progress=False, max_steps=2)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [0, 1, 2, 3]


def test_negative_threads_and_max_steps_are_refused_by_name(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ivvae.cli import main

    base = ["train", "--out", str(tmp_path / "run"), "--data", str(tmp_path), "--no-progress"]
    assert main([*base, "--threads", "-3"]) == 2
    assert "--threads must be 0 (torch's default) or more, got -3" in capsys.readouterr().err
    assert main([*base, "--max-steps", "-1"]) == 2
    assert "--max-steps must be 0 or more, got -1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_damaged_optimizer_file_is_named_with_what_to_do(tmp_path: Path,
                                                           clips: ClipDataset) -> None:
    _trained(tmp_path, clips, 2)
    optim = tmp_path / "checkpoint" / "optim.safetensors"
    optim.write_bytes(optim.read_bytes()[:100])
    again = Trainer(tiny_cfg(tmp_path, image_steps=2, video_steps=6, save_every=2),
                    dataset=clips)
    with pytest.raises(ValueError, match=rf"{optim} is damaged \(.*\): .*--init-weights "
                                         rf"{optim.parent / 'model.safetensors'}"):
        again.resume()


def test_the_decoded_size_is_estimated_said_and_refused_past_the_machines_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ivvae.memory
    from ivvae.train.data import estimate_bytes

    clip, still = tmp_path / "clip.mp4", tmp_path / "still.png"
    media.make_video(clip, frames=12, width=64, height=48)
    still.write_bytes(media.make_image("png", 80, 64))
    paths = [clip, still]
    for max_side, scales in ((256, ()), (32, (16,))):
        loaded = ClipDataset.from_paths(paths, max_side=max_side, extra_scales=scales)
        need, unknown = estimate_bytes(paths, max_side=max_side, max_frames=600,
                                       extra_scales=scales)
        assert unknown == 0
        assert need == pytest.approx(sum(c.nbytes for c in loaded.clips), rel=0.1)
    lines: list[str] = []
    cfg = tiny_cfg(tmp_path / "run", data=(str(clip), str(still)))
    Trainer(cfg, say=lines.append)
    assert lines[0].startswith("loading training data: 2 files, about 0 MB decoded")
    assert lines[-1] == "loaded 2 clips from 2 files: 44 frames, 0 MB in memory"
    monkeypatch.setattr(ivvae.memory, "machine_memory_bytes", lambda: 100_000)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"about 0\.0 GB decoded in memory in each of the 2 "
                                         r"ranks here \(2 files; .*more than this machine's "
                                         r"0\.0 GB: train on fewer clips, or lower "):
        Trainer(cfg)
