"""Checkpoints are verified on load: a corrupt or half-written one is skipped for the newest
one that passes its SHA-256 manifest, and a save killed midway never moves LATEST."""

from __future__ import annotations

from pathlib import Path

import pytest

from learner.trainer import pick_checkpoint, verify_checkpoint, write_manifest


def fake_checkpoint(root: Path, tag: str, payload: bytes) -> Path:
    d = root / tag
    (d / "hf").mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(payload)
    (d / "hf" / "model.safetensors").write_bytes(payload * 2)
    (d / "learner_state.json").write_text('{"step": 1}')
    write_manifest(d)
    return d


def test_latest_is_used_when_it_verifies(tmp_path):
    fake_checkpoint(tmp_path, "step0000001", b"a")
    fake_checkpoint(tmp_path, "step0000002", b"b")
    (tmp_path / "LATEST").write_text("step0000002")
    assert pick_checkpoint(tmp_path) == "step0000002"


def test_a_corrupt_latest_falls_back_to_the_previous_checkpoint(tmp_path):
    fake_checkpoint(tmp_path, "step0000001", b"a")
    bad = fake_checkpoint(tmp_path, "step0000002", b"b")
    (bad / "hf" / "model.safetensors").write_bytes(b"flipped bits")
    (tmp_path / "LATEST").write_text("step0000002")
    assert "checksum mismatch in hf/model.safetensors" in verify_checkpoint(bad)
    assert pick_checkpoint(tmp_path) == "step0000001"


def test_a_save_killed_before_its_manifest_is_never_resumed(tmp_path):
    fake_checkpoint(tmp_path, "step0000001", b"a")
    half = tmp_path / "step0000002"
    half.mkdir()
    (half / "mp_rank_00_model_states.pt").write_bytes(b"partial")  # no manifest: killed
    (tmp_path / "LATEST").write_text("step0000001")  # LATEST only moves after the manifest
    assert verify_checkpoint(half).endswith("(incomplete save)")
    assert pick_checkpoint(tmp_path) == "step0000001"


def test_no_usable_checkpoint_is_a_clear_error(tmp_path):
    d = fake_checkpoint(tmp_path, "step0000001", b"a")
    (d / "learner_state.json").unlink()
    (tmp_path / "LATEST").write_text("step0000001")
    with pytest.raises(RuntimeError, match="no checkpoint .* passes its checksums"):
        pick_checkpoint(tmp_path)


def test_no_checkpoint_at_all_means_a_fresh_start(tmp_path):
    assert pick_checkpoint(tmp_path) is None


# ---------------------------------------------------------------- the real Trainer.save

@pytest.fixture(scope="module")
def trainer(tiny_model):
    """A one-rank DeepSpeed Trainer in this process (gloo on CPU), torn down afterwards."""
    import torch.distributed as dist

    from launch.ports import free_ports
    from learner.config import LearnerConfig
    from learner.objective import PRESETS
    from learner.trainer import Trainer, init_distributed

    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_ports(1)[0]), "DS_ACCELERATOR": "cpu"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        init_distributed()
        try:
            yield Trainer(LearnerConfig(), PRESETS["dynamo"], str(tiny_model), temperature=1.0)
        finally:
            dist.destroy_process_group()


def _fail_latest_rename(real):
    def replace(src, dst, *a, **kw):
        if Path(dst).name == "LATEST":
            raise OSError("killed before LATEST moved")
        return real(src, dst, *a, **kw)
    return replace


@pytest.mark.parametrize("where", ["hf_weights", "copies", "manifest", "latest_rename"])
def test_a_save_failing_between_its_writes_never_moves_latest(trainer, tiny_model, tmp_path,
                                                              monkeypatch, where):
    """Trainer.save itself, with a failure injected after the DeepSpeed state (HF weights),
    after the weights (copying tokenizer files and extras), before the manifest, or at the
    LATEST rename: the previous checkpoint stays the one that resumes, with its version."""
    import learner.trainer as tr

    root, extra = tmp_path / "checkpoints", tmp_path / "allocator_state.pkl"
    extra.write_bytes(b"snapshot")
    trainer.version = 1
    trainer.save(root, "step0000001", {"step": 1, "version": 1}, str(tiny_model), [extra])
    trainer.version = 2

    def boom(*_a, **_kw):
        raise OSError(f"killed at {where}")
    if where == "hf_weights":
        monkeypatch.setattr(trainer, "_write_hf", boom)
    elif where == "copies":
        monkeypatch.setattr(tr.shutil, "copy", boom)
    elif where == "manifest":
        monkeypatch.setattr(tr, "write_manifest", boom)
    else:
        monkeypatch.setattr(tr.os, "replace", _fail_latest_rename(tr.os.replace))
    with pytest.raises(OSError, match="killed"):
        trainer.save(root, "step0000002", {"step": 2, "version": 2}, str(tiny_model), [extra])
    monkeypatch.undo()
    assert (root / "LATEST").read_text() == "step0000001"
    assert (root / "step0000002").is_dir()  # the failed save did write something
    assert pick_checkpoint(root) == "step0000001"
    assert trainer.load(root)["version"] == 1 and trainer.version == 1
