"""tools/diagnose.py reads semantic features back as pixels; its semantic rows are only as good as that."""
import torch

import tokenizer
import world
from tools import diagnose


def test_semantic_features_read_back_as_the_frames_they_came_from():
    cfg = tokenizer.PRESETS["tiny"]
    specs = world.draw_clips(6, torch.Generator().manual_seed(0))
    video = world.render(specs)  # uint8 (B, 17, H, W, 3)
    patch_features = tokenizer.FrozenPatchFeatures(cfg)
    features = patch_features(video.permute(0, 4, 1, 2, 3).float() / 127.5 - 1)
    frames = diagnose.features_to_frames(features, patch_features)
    assert torch.equal(frames, video[:, ::cfg.time_stride])  # exactly the semantic frames, pixel for pixel
    rows = diagnose.judge_semantic(frames, specs, cfg.time_stride)
    assert all(r["direction"] and r["speed"] and r["path"] for r in rows)
    still = [dict(s, v=s["v"] + 0.5) for s in specs]  # the same frames asked at another speed: caught
    assert not any(r["speed"] for r in diagnose.judge_semantic(frames, still, cfg.time_stride))
