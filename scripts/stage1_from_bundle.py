"""Stage 1 of the demo bundle (its weights, unchanged; config overrides may add spatial maps) as a run's stage1.pt.

    .venv/bin/python scripts/stage1_from_bundle.py RUN [section.key=value ...]

Then ``petriage-train features|stage2|evaluate --run RUN`` train and test another stage 2 on it.
"""
import sys
from pathlib import Path

sys.path.insert(0, ".")
from training.config import load_train_config  # noqa: E402
from training.engine import build_slice_net, initial_state, load_initial_weights, save_checkpoint  # noqa: E402

run, overrides = Path(sys.argv[1]), sys.argv[2:]
cfg = load_train_config(Path("training/configs/varied.yaml"), overrides)
model = build_slice_net(cfg)
load_initial_weights(model, initial_state(cfg, Path("models/demo"), model))
run.mkdir(parents=True, exist_ok=True)
save_checkpoint(run / "stage1.pt", {"stage": "stage1", "epoch": 0, "model": model.state_dict(),
                                    "config": cfg.model_dump(mode="json"),
                                    "preprocess": cfg.preprocess.spec().to_dict(), "feature_dim": model.feature_dim,
                                    "best": float("nan"), "val_slice_auc": float("nan")})
print("stage1.pt", run, model.feature_dim)
