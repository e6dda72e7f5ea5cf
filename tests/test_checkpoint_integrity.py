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
